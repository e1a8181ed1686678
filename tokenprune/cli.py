"""What the `python -m tokenprune.train|eval` entry points do around Hydra: checks first, one-line errors.

`preflight(config_name)` composes the command line's config and runs `tokenprune.eval.preflight.check`
before `@hydra.main` starts, so a bad config, missing data or an unusable outputs folder stops the
command before Hydra creates `outputs/runs/<date>/<time>/` and before any model loads. For a sweep
(`-m`), the environment (outputs folder, SLURM) is checked up front and each job checks its own
config. `one_line_errors()` turns a `UserError` raised inside a job into one line on stderr and
exit status 2.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from tokenprune.config import UserError

EXIT_BAD_INPUT = 2
# Hydra flags that only print or inspect: nothing runs, nothing to check.
_INSPECT = ("cfg", "help", "hydra_help", "info", "shell_completion", "resolve")


def fail(error: UserError) -> None:
    """Print the error as one line and exit with status 2."""
    message = " ".join(str(error).split())
    print(f"tokenprune: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside a Hydra job: a `UserError` becomes one line on stderr and exit status 2."""
    try:
        yield
    except UserError as error:
        fail(error)


def preflight(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Check the command line's config before Hydra runs it; on bad input print one line and exit 2."""
    from hydra._internal.utils import get_args_parser

    args, _unknown = get_args_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if any(getattr(args, flag, None) for flag in _INSPECT):
        return
    try:
        _check(config_name, list(args.overrides or []), sweep=bool(args.multirun))
    except UserError as error:
        fail(error)


def _check(config_name: str, overrides: list[str], sweep: bool) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tokenprune.config import compose
    from tokenprune.eval import preflight

    if sweep:  # the sweep's fixed overrides only: each job checks its own point
        parsed = OverridesParser.create().parse_overrides(overrides)
        overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        cfg = compose(overrides, config_name=config_name)
    except (HydraException, OmegaConfBaseException):
        return  # Hydra reports composition errors itself (with the valid options)
    preflight.check_launcher(HydraConfig.get().runtime.choices.get("hydra/launcher"))
    if sweep:
        preflight.check_outputs(str(cfg.paths.outputs))
        return
    preflight.check(cfg, overrides=overrides)
