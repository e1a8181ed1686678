"""The package's layers import one way (docs/architecture.md), and no module outgrows a screenful of screens.

An AST walk over every module under tokenprune/ (nothing is imported): each `import tokenprune.X` or
`from tokenprune.X import ...`, at module level or inside a function, must name a unit in the same layer
or a lower one, and the units must not import each other in a circle. A new back-edge fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tokenprune"

# Bottom to top. A unit is a top-level module or package of tokenprune; every `__main__` is an entry point.
LAYERS: list[set[str]] = [
    {"__init__", "types", "config", "atomic", "results", "synthetic", "templates"},  # foundation: leaves
    {"reducers"},  # pure tensor code
    {"models"},  # one adapter per family
    {"data", "explain", "fitting", "stages"},  # data, GAE labels + the mapper's fit, Lightning pieces, saving
    {"eval"},
    {"train"},  # fits, then evaluates (imports eval; eval never imports train)
    # entry points; `recipes`: the miniature's build recipe (`python -m tokenprune.recipes.mini_shapes`)
    {"tables", "cli", "label", "visualize", "recipes", "__main__"},
]

# Known back-edges, each with the change that removes it. Delete an entry when its edge is gone.
ALLOWED: dict[tuple[str, str], str] = {}

RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name: its top-level name under tokenprune, or __main__."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(module: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported tokenprune module, line) for every import statement in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
    return [(name, line) for name, line in found if name == "tokenprune" or name.startswith("tokenprune.")]


def back_edges(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import in {module: (source, is_package)} that runs up a layer or into an unknown unit."""
    problems = []
    for module, (source, is_package) in sorted(modules.items()):
        mine = unit_of(module)
        for target, line in imports_of(module, source, is_package):
            theirs = unit_of(target)
            if theirs == mine or (module, theirs) in ALLOWED:
                continue
            if mine not in RANK or theirs not in RANK:
                unknown = mine if mine not in RANK else theirs
                problems.append(f"{module}:{line}: unit {unknown!r} is in no layer of tests/test_layers.py")
            elif RANK[theirs] > RANK[mine]:
                problems.append(
                    f"{module}:{line} imports {target}: {mine} (layer {RANK[mine]}) -> {theirs} "
                    f"(layer {RANK[theirs]}) runs back up"
                )
    return problems


def cycles(modules: dict[str, tuple[str, bool]]) -> list[list[str]]:
    """Circles among units of one layer (a layer's units may import each other, but only one way)."""
    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in modules.items():
        mine = unit_of(module)
        for target, _ in imports_of(module, source, is_package):
            theirs = unit_of(target)
            if theirs != mine and (module, theirs) not in ALLOWED:
                graph.setdefault(mine, set()).add(theirs)
    found, state = [], {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = "open"
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt] if nxt in path else [unit, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[unit] = "done"

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])
    return found


def package_modules() -> dict[str, tuple[str, bool]]:
    return {
        module_name(path): (path.read_text(), path.name == "__init__.py") for path in PACKAGE.rglob("*.py")
    }


def test_every_import_runs_down_the_layers():
    problems = back_edges(package_modules())
    assert not problems, "imports that run back up (see docs/architecture.md):\n" + "\n".join(problems)


def test_no_circle_between_units():
    assert cycles(package_modules()) == []


def test_every_allowed_back_edge_still_exists():
    # an allow-list entry whose edge is gone is stale: delete it
    modules = package_modules()
    for module, unit in ALLOWED:
        source, is_package = modules.get(module, ("", False))
        assert any(unit_of(t) == unit for t, _ in imports_of(module, source, is_package)), (module, unit)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("tokenprune.reducers.fake", "from tokenprune.models.base import Adapter\n"),
        ("tokenprune.eval.fake", "def f():\n    from tokenprune.train import lora\n"),
        ("tokenprune.types", "import tokenprune.eval.runner\n"),
        ("tokenprune.models.fake", "from ..explain import labels\n"),
    ],
)
def test_a_back_edge_is_caught(module, source):
    # the checker itself: each of these runs up a layer (the last one through a relative import)
    assert back_edges({module: (source, False)})


def test_a_circle_within_a_layer_is_caught():
    modules = {
        "tokenprune.data.fake": ("from tokenprune.explain import labels\n", False),
        "tokenprune.explain.fake": ("from tokenprune.data import shapes\n", False),
    }
    assert not back_edges(modules) and cycles(modules)


def test_no_module_over_600_lines():
    long = {
        module: n
        for module, (source, _) in package_modules().items()
        if (n := len(source.splitlines())) > 600
    }
    assert not long, f"split these modules (over ~600 lines): {long}"
