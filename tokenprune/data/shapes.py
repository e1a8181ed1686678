"""The synthetic "shapes" visual-QA world: scenes, images, grounded questions and their writers.

A scene is 1-8 objects (shape x colour x size x position, never touching) on a grey background,
optionally with grey clutter (lines, specks: achromatic, so never an object), rendered at the
tiny LLaVA's resolution: 96 x 96 px, a 24 x 24 grid of 4-px patches. Every answer is computed
from the scene's object list. Item `i` of split `s` is a pure function of `(seed, s, i)`: its own
numpy generator is seeded with `SeedSequence([seed, SPLITS[s], i])`, so any item is reproducible
alone and the splits never share a stream.

Question kinds (`Question.kind`):

* ``existence``: "Is there a red circle in the image?" (POPE). Per scene and per POPE category one
  present object ("yes") and one absent object ("no"): ``random`` = any absent (colour, shape);
  ``popular`` = one of the `popular_k` most frequent absent objects of the world (the generator's
  prior, which the split's object frequencies estimate: a per-item rule keeps items independent);
  ``adversarial`` = an absent object sharing its colour or its shape with a present one.
* ``color`` / ``shape`` / ``size``: "What color is the square?" only when exactly one square is
  there; "What shape is the red object?"; "What size is the red circle?" (small | large).
* ``count``: "How many circles are there?", "... red objects ...", "... objects ...", "... red circles ...".
* ``position``: "Is the red circle left of the blue square?" (left of | right of | above | below),
  and ``which``: "Which is higher, the red circle or the blue square?" -> "red circle". Both need
  uniquely named objects whose centres are at least `MARGIN` px apart on that axis.
* ``mc``: a letter answer over 2-4 options (colour, shape, count, "Which of these objects is in the
  image?", "Which of these objects is furthest left?"), formatted as ScienceQA's prompt.

The writers are in `tokenprune.data.shapes_export`: the val/test splits as parquet tables in the
exact schemas of lmms-lab/POPE, lmms-lab/VQAv2 and lmms-lab/ScienceQA (ScienceQA-IMG), so that
lmms-eval's own POPE / VQAv2 / ScienceQA code prompts and scores them, and the train split as
LLaVA instruction JSON plus PNG files.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96  # px: 24 x 24 patches of 4 px, the tiny LLaVA's grid
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 230),
    "yellow": (240, 205, 30),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
}
SIZES = {"small": 12, "large": 20}  # side of the object's box in px (3 and 5 patches)
# The generator's prior: skewed, so that POPE's "popular" negatives differ from random ones.
SHAPE_PRIOR = dict(zip(SHAPES, (0.30, 0.25, 0.20, 0.15, 0.10)))
COLOR_PRIOR = dict(zip(COLORS, (0.25, 0.20, 0.18, 0.15, 0.12, 0.10)))
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # (colour, shape)
GAP = 2  # min free px between two objects, and between an object and the border
MARGIN = 8  # min px between two centres on an axis for a relative-position question (2 patches)
SPLITS = {"train": 0, "val": 1, "test": 2}
POPE_CATEGORIES = ("adversarial", "popular", "random")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5 / lmms-eval suffix
MC_ANSWER = "\nAnswer with the option's letter from the given choices directly."  # ScienceQA suffix
LETTERS = "ABCD"
KINDS = ("existence", "color", "shape", "size", "count", "position", "which", "mc")
VQA_KINDS = ("color", "shape", "size", "count", "position", "which")

# Question templates (also the tokenizer corpus, `shapes_corpus`).
T_EXISTS = "Is there {obj} in the image?"
T_COLOR = "What color is the {shape}?"
T_SHAPE = "What shape is the {color} object?"
T_SIZE = "What size is the {name}?"
T_COUNT_SHAPE = "How many {plural} are there?"
T_COUNT_COLOR = "How many {color} objects are there?"
T_COUNT_ALL = "How many objects are there?"
T_COUNT_PAIR = "How many {color} {plural} are there?"
T_POSITION = "Is the {a} {relation} the {b}?"
T_WHICH = "Which is {relation}, the {a} or the {b}?"
T_MC_PRESENT = "Which of these objects is in the image?"
T_MC_EXTREME = "Which of these objects is {extreme}?"
RELATIONS = ("left of", "right of", "above", "below")
WHICH = ("further left", "further right", "higher", "lower")
EXTREMES = ("furthest left", "furthest right", "highest", "lowest")


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn.

    Attributes:
        min_objects: fewest objects in a scene (>= 1).
        max_objects: most objects in a scene (<= 8; a crowded scene may place fewer).
        clutter: probability that a scene has grey clutter (lines and specks) on its background.
        popular_k: POPE "popular" negatives come from the k most frequent absent objects.
    """

    min_objects: int = 1
    max_objects: int = 8
    clutter: float = 0.5
    popular_k: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 8, got {self}")


@dataclass(frozen=True)
class Obj:
    """One object: its box is `SIZES[size]` px square with top-left corner (x, y)."""

    shape: str
    color: str
    size: str
    x: int
    y: int

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive pixel bounds."""
        return (self.x, self.y, self.x + self.side - 1, self.y + self.side - 1)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + (self.side - 1) / 2, self.y + (self.side - 1) / 2)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: objects, background grey level and clutter marks.

    `lines` are (x0, y0, x1, y1, grey) 1-px segments, `dots` are (x, y, side, grey) squares; both
    are drawn under the objects.
    """

    objects: tuple[Obj, ...]
    background: int = 240
    lines: tuple[tuple[int, int, int, int, int], ...] = ()
    dots: tuple[tuple[int, int, int, int], ...] = ()

    def present(self) -> set[tuple[str, str]]:
        """The (colour, shape) types in the scene."""
        return {(o.color, o.shape) for o in self.objects}

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            (shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects
        )

    def unique(self) -> dict[str, Obj]:
        """Objects whose name ("red circle") occurs once, by name, in scene order."""
        counts = Counter(o.name for o in self.objects)
        return {o.name: o for o in self.objects if counts[o.name] == 1}


@dataclass(frozen=True)
class Question:
    """A grounded question. `text` has no answer-format suffix; `prompt` is what the model reads.

    Attributes:
        kind: one of KINDS.
        answer: the exact answer ("yes", "red", "3", "red circle"; the option letter for "mc").
        answer_type: VQAv2's yes/no | number | other.
        question_type: VQAv2's question prefix ("how many", "what color is the", ...).
        category: POPE category of an existence question ("" outside POPE).
        choices: the options of a multiple-choice question (A, B, ...).
        topic: the multiple-choice subtype (color | shape | count | present | position).
    """

    kind: str
    text: str
    answer: str
    answer_type: str = "other"
    question_type: str = ""
    category: str = ""
    choices: tuple[str, ...] = ()
    topic: str = ""

    @property
    def prompt(self) -> str:
        """The user message after the image: lmms-eval's POPE/VQAv2 or ScienceQA prompt."""
        if self.choices:
            options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(self.choices))
            return f"{self.text}\n{options}{MC_ANSWER}"
        return self.text + SHORT_ANSWER

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _apart(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return bx0 > ax1 + GAP or ax0 > bx1 + GAP or by0 > ay1 + GAP or ay0 > by1 + GAP


def item_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of item `index` of `split` (stream 1: the training-turn order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index, stream]))


def sample_scene(rng: np.random.Generator, config: WorldConfig = WorldConfig()) -> Scene:
    """Draw a scene: objects from the prior at free positions, a grey level, maybe clutter."""
    shape_p = np.array(list(SHAPE_PRIOR.values()))
    color_p = np.array(list(COLOR_PRIOR.values()))
    colors = list(COLORS)
    objects: list[Obj] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        shape = SHAPES[int(rng.choice(len(SHAPES), p=shape_p))]
        color = colors[int(rng.choice(len(colors), p=color_p))]
        size = "large" if rng.random() < 0.5 else "small"
        high = IMAGE_SIZE - GAP - SIZES[size] + 1
        for _attempt in range(100):  # rejection sampling; a crowded scene may drop an object
            x, y = (int(v) for v in rng.integers(GAP, high, size=2))
            candidate = Obj(shape, color, size, x, y)
            if all(_apart(candidate, other) for other in objects):
                objects.append(candidate)
                break
    background = int(rng.integers(225, 251))
    lines: list[tuple[int, int, int, int, int]] = []
    dots: list[tuple[int, int, int, int]] = []
    if rng.random() < config.clutter:
        for _ in range(int(rng.integers(2, 6))):
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, IMAGE_SIZE, size=4))
            lines.append((x0, y0, x1, y1, int(rng.integers(140, 206))))
        for _ in range(int(rng.integers(8, 25))):
            x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - 1, size=2))
            dots.append((x, y, int(rng.integers(1, 3)), int(rng.integers(140, 206))))
    return Scene(tuple(objects), background, tuple(lines), tuple(dots))


# 5-pointed star, unit outer radius, first point up; inner radius 0.45.
_STAR = tuple(
    ((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
     (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
    for k in range(10)
)  # fmt: skip


# Each shape's fill texture: pixel (x, y) of the object takes the shaded colour where the pattern
# is true. The period is 2 px, so every 4 x 4 patch that an object covers shows its texture: shape
# is visible inside one patch, like colour (docs/miniature.md explains why the world needs this).
TEXTURES: dict[str, Any] = {
    "circle": lambda x, y: np.zeros_like(x, dtype=bool),  # solid
    "square": lambda x, y: y % 2 == 1,  # horizontal stripes
    "triangle": lambda x, y: x % 2 == 1,  # vertical stripes
    "star": lambda x, y: (x + y) % 2 == 1,  # checkerboard
    "cross": lambda x, y: (x % 2 == 0) & (y % 2 == 0),  # dots
}
SHADE = 0.55  # the texture's colour is the object's colour times SHADE (still chromatic)


def shaded(color: str) -> tuple[int, int, int]:
    return tuple(round(v * SHADE) for v in COLORS[color])


def render(scene: Scene) -> Image.Image:
    """The scene as a 96 x 96 RGB image, no antialiasing: an object's pixels are its colour or,
    where its shape's texture says so, the shaded colour (`TEXTURES`, `shaded`)."""
    grey = scene.background
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1, g in scene.lines:
        draw.line((x0, y0, x1, y1), fill=(g, g, g), width=1)
    for x, y, side, g in scene.dots:
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(g, g, g))
    pixels = np.array(image)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    for obj in scene.objects:
        mask = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_outline(ImageDraw.Draw(mask), obj)
        inside = np.asarray(mask, dtype=bool)
        pixels[inside] = COLORS[obj.color]
        pixels[inside & TEXTURES[obj.shape](xs, ys)] = shaded(obj.color)
    return Image.fromarray(pixels)


def _draw_outline(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    """Fill `obj`'s outline with 1 on a mode-"1" mask."""
    x0, y0, x1, y1 = obj.box
    cx, cy = obj.center
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=1)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=1)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=1)
    elif obj.shape == "star":
        r = (obj.side - 1) / 2
        draw.polygon([(cx + r * u, cy + r * v) for u, v in _STAR], fill=1)
    elif obj.shape == "cross":
        t = obj.side / 6  # half the arm thickness
        draw.rectangle((x0, round(cy - t), x1, round(cy + t)), fill=1)
        draw.rectangle((round(cx - t), y0, round(cx + t), y1), fill=1)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ questions
def existence_question(scene: Scene, color: str, shape: str, category: str = "") -> Question:
    answer = "yes" if (color, shape) in scene.present() else "no"
    text = T_EXISTS.format(obj=_article(f"{color} {shape}"))
    return Question("existence", text, answer, "yes/no", "is there a", category)


def _count(text: str, n: int) -> Question:
    return Question("count", text, str(n), "number", "how many")


def all_questions(scene: Scene) -> list[Question]:
    """Every well-posed non-multiple-choice question about `scene`, in a fixed order."""
    out = [existence_question(scene, color, shape) for color, shape in PAIRS]
    for shape in SHAPES:
        if scene.count(shape=shape) == 1:
            (obj,) = (o for o in scene.objects if o.shape == shape)
            out.append(
                Question("color", T_COLOR.format(shape=shape), obj.color, "other", "what color is the")
            )
    for color in COLORS:
        if scene.count(color=color) == 1:
            (obj,) = (o for o in scene.objects if o.color == color)
            out.append(
                Question("shape", T_SHAPE.format(color=color), obj.shape, "other", "what shape is the")
            )
    unique = scene.unique()
    for name, obj in unique.items():
        out.append(Question("size", T_SIZE.format(name=name), obj.size, "other", "what size is the"))
    out += [_count(T_COUNT_SHAPE.format(plural=PLURALS[s]), scene.count(shape=s)) for s in SHAPES]
    out += [_count(T_COUNT_COLOR.format(color=c), scene.count(color=c)) for c in COLORS]
    out.append(_count(T_COUNT_ALL, len(scene.objects)))
    out += [_count(T_COUNT_PAIR.format(color=c, plural=PLURALS[s]), scene.count(s, c)) for c, s in PAIRS]
    for a, obj_a in unique.items():
        for b, obj_b in unique.items():
            if a == b:
                continue
            dx = obj_b.center[0] - obj_a.center[0]  # > 0: a is left of b
            dy = obj_b.center[1] - obj_a.center[1]  # > 0: a is above b (image y grows downwards)
            truths: dict[str, bool] = {}  # relation -> does it hold for (a, b)
            if abs(dx) >= MARGIN:
                truths.update(
                    {"left of": dx > 0, "further left": dx > 0, "right of": dx < 0, "further right": dx < 0}
                )
            if abs(dy) >= MARGIN:
                truths.update({"above": dy > 0, "higher": dy > 0, "below": dy < 0, "lower": dy < 0})
            for relation in RELATIONS:
                if relation in truths:
                    text = T_POSITION.format(a=a, relation=relation, b=b)
                    out.append(
                        Question("position", text, "yes" if truths[relation] else "no", "yes/no", "is the")
                    )
            for relation in WHICH:
                if relation in truths:
                    text = T_WHICH.format(relation=relation, a=a, b=b)
                    out.append(Question("which", text, a if truths[relation] else b, "other", "which is"))
    return out


def pope_negative(
    scene: Scene, category: str, rng: np.random.Generator, popular_k: int = 3
) -> tuple[str, str]:
    """An absent (colour, shape) for a POPE category (see the module docstring)."""
    present = scene.present()
    absent = [p for p in PAIRS if p not in present]
    if category == "random":
        pool = absent
    elif category == "popular":
        pool = sorted(absent, key=lambda p: (-SHAPE_PRIOR[p[1]] * COLOR_PRIOR[p[0]], PAIRS.index(p)))[
            :popular_k
        ]
    elif category == "adversarial":
        pool = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)] or absent
    else:
        raise ValueError(f"POPE category must be one of {POPE_CATEGORIES}, got {category!r}")
    return pool[int(rng.integers(len(pool)))]


def count_question(scene: Scene, rng: np.random.Generator) -> Question:
    """A counting question; mostly about present shapes/colours, sometimes an absent one (0)."""
    subtype = int(rng.integers(4))
    if subtype == 2:
        return _count(T_COUNT_ALL, len(scene.objects))
    values: list[Any] = list(SHAPES) if subtype == 0 else list(COLORS) if subtype == 1 else list(PAIRS)
    present = [v for v in values if _count_of(scene, v) > 0]
    absent = [v for v in values if _count_of(scene, v) == 0]
    pool = present if (rng.random() < 0.85 or not absent) else absent
    value = pool[int(rng.integers(len(pool)))]
    if subtype == 0:
        text = T_COUNT_SHAPE.format(plural=PLURALS[value])
    elif subtype == 1:
        text = T_COUNT_COLOR.format(color=value)
    else:
        text = T_COUNT_PAIR.format(color=value[0], plural=PLURALS[value[1]])
    return _count(text, _count_of(scene, value))


def _count_of(scene: Scene, value: Any) -> int:
    if isinstance(value, tuple):
        return scene.count(shape=value[1], color=value[0])
    return scene.count(shape=value) if value in SHAPES else scene.count(color=value)


def _pick(rng: np.random.Generator, pool: Sequence[Any], k: int) -> list[Any]:
    return [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]


def _extreme_choices(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str], str] | None:
    """(extreme, options, answer) for "Which of these objects is furthest left?", or None."""
    unique = list(scene.unique().values())
    if len(unique) < 2:
        return None
    axis = int(rng.integers(4))  # furthest left, furthest right, highest, lowest
    sign = 1 if axis in (0, 2) else -1
    for _attempt in range(4):
        chosen = _pick(rng, unique, min(4, len(unique)))
        keys = sorted(sign * o.center[axis // 2] for o in chosen)
        if keys[1] - keys[0] >= MARGIN:
            best = min(chosen, key=lambda o: sign * o.center[axis // 2])
            return EXTREMES[axis], [o.name for o in chosen], best.name
    return None


def mc_question(scene: Scene, rng: np.random.Generator, pool: dict[str, list[Question]]) -> Question:
    """A multiple-choice question with 2-4 options and a letter answer (ScienceQA style)."""
    extreme = _extreme_choices(scene, rng)
    topics = (
        [t for t in ("color", "shape") if pool[t]] + ["count", "present"] + (["position"] if extreme else [])
    )
    topic = topics[int(rng.integers(len(topics)))]
    if topic in ("color", "shape"):
        base = pool[topic][int(rng.integers(len(pool[topic])))]
        values = list(COLORS) if topic == "color" else list(SHAPES)
        text, answer = base.text, base.answer
        options = [answer, *_pick(rng, [v for v in values if v != answer], 3)]
    elif topic == "count":
        base = count_question(scene, rng)
        text, answer = base.text, base.answer
        near = [str(k) for k in range(9) if k != int(answer) and abs(k - int(answer)) <= 3]
        options = sorted([answer, *_pick(rng, near, 3)], key=int)
    elif topic == "present":
        present = sorted(scene.present(), key=PAIRS.index)
        absent = [p for p in PAIRS if p not in scene.present()]
        close = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)]
        color, shape = present[int(rng.integers(len(present)))]
        text, answer = T_MC_PRESENT, f"{color} {shape}"
        options = [answer, *[f"{c} {s}" for c, s in _pick(rng, close if len(close) >= 3 else absent, 3)]]
    else:
        assert extreme is not None
        relation, options, answer = extreme
        text = T_MC_EXTREME.format(extreme=relation)
    if topic != "count":
        options = [options[int(i)] for i in rng.permutation(len(options))]
    letter = LETTERS[options.index(answer)]
    return Question("mc", text, letter, "other", "which", choices=tuple(options), topic=topic)


def sample_questions(
    scene: Scene, rng: np.random.Generator, config: WorldConfig = WorldConfig()
) -> list[Question]:
    """One item's questions: per POPE category a yes and a no, then one per other kind when possible."""
    out: list[Question] = []
    present = sorted(scene.present(), key=PAIRS.index)
    positives = [present[int(i)] for i in rng.permutation(len(present))]
    for k, category in enumerate(POPE_CATEGORIES):
        color, shape = positives[k % len(positives)]
        out.append(existence_question(scene, color, shape, category))
        color, shape = pope_negative(scene, category, rng, config.popular_k)
        out.append(existence_question(scene, color, shape, category))
    pool: dict[str, list[Question]] = {kind: [] for kind in KINDS}
    for question in all_questions(scene):
        pool[question.kind].append(question)
    for kind in ("color", "shape", "size"):
        if pool[kind]:
            out.append(pool[kind][int(rng.integers(len(pool[kind])))])
    out.append(count_question(scene, rng))
    for kind in ("position", "which"):
        if pool[kind]:
            out.append(pool[kind][int(rng.integers(len(pool[kind])))])
    out.append(mc_question(scene, rng, pool))
    return out


@dataclass(frozen=True)
class Item:
    """One image of a split with its scene and questions."""

    split: str
    index: int
    seed: int
    scene: Scene
    questions: tuple[Question, ...]

    @property
    def id(self) -> str:
        return f"shapes_{self.split}_{self.index:06d}"

    def image(self) -> Image.Image:
        return render(self.scene)

    def png(self) -> bytes:
        return png_bytes(self.image())


def make_item(index: int, split: str = "test", seed: int = 0, config: WorldConfig | None = None) -> Item:
    """Item `index` of `split`: a pure function of (seed, split, index, config)."""
    config = config or WorldConfig()
    rng = item_rng(seed, split, index)
    scene = sample_scene(rng, config)
    return Item(split, index, seed, scene, tuple(sample_questions(scene, rng, config)))


def make_split(
    split: str, n: int, seed: int = 0, config: WorldConfig | None = None, start: int = 0
) -> list[Item]:
    """Items `start .. start + n - 1` of `split`."""
    return [make_item(i, split, seed, config) for i in range(start, start + n)]


def shapes_corpus() -> list[str]:
    """Every question template, answer and option text of the world (a tokenizer training corpus)."""
    from tokenprune.templates import LLAVA15_SYSTEM

    names = [f"{c} {s}" for c, s in PAIRS]
    lines = [LLAVA15_SYSTEM + " USER: <image>", "ASSISTANT:", SHORT_ANSWER.strip(), MC_ANSWER.strip()]
    lines += [T_EXISTS.format(obj=_article(name)) for name in names]
    lines += [T_COLOR.format(shape=s) for s in SHAPES] + [T_SHAPE.format(color=c) for c in COLORS]
    lines += [T_SIZE.format(name=name) for name in names]
    lines += [T_COUNT_SHAPE.format(plural=PLURALS[s]) for s in SHAPES]
    lines += [T_COUNT_COLOR.format(color=c) for c in COLORS] + [T_COUNT_ALL]
    lines += [T_COUNT_PAIR.format(color=c, plural=PLURALS[s]) for c, s in PAIRS]
    for a in names:
        for b in names:
            if a != b:
                lines += [T_POSITION.format(a=a, relation=r, b=b) for r in RELATIONS]
                lines += [T_WHICH.format(relation=r, a=a, b=b) for r in WHICH]
    lines += [T_MC_PRESENT] + [T_MC_EXTREME.format(extreme=e) for e in EXTREMES]
    options = [*COLORS, *SHAPES, *(str(k) for k in range(9)), *names]
    lines += [f"{letter}. {option}" for letter in LETTERS for option in options]
    lines += ["yes", "no", *SIZES, *options, *LETTERS]
    return list(dict.fromkeys(lines))
