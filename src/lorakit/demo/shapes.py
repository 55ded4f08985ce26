"""Synthetic 64-px pictures of coloured shapes — the demo model's training data, and training images for example
LoRAs. Pure numpy/PIL, deterministic for a seed.

A ``Scene`` says what is drawn (shape, colour, background, size, position, one or two shapes, a small jitter);
``render(scene)`` draws it; ``captions.caption(scene, phrasing)`` describes it. ``held_out(scene)`` is the frozen
rule that keeps one combination of shape, colour, size, position and count in eight out of training: the demo
model never sees those pictures, and its evaluation set (``evalset``) asks only for them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn at 4× and box-filtered down: smooth edges
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (250, 140, 0), "yellow": (245, 215, 30), "green": (30, 160, 50),
    "blue": (30, 70, 220), "purple": (130, 40, 180), "pink": (250, 120, 190), "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": COLOURS["white"], "black": COLOURS["black"], "gray": (128, 128, 128),
}
# Unit outlines in [-1, 1]² (each fills that box exactly); the circle is drawn as an ellipse.
OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
}


def _star() -> tuple[tuple[float, float], ...]:
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    x, y = radii * np.cos(angles), -radii * np.sin(angles)
    x = 2 * (x - x.min()) / (x.max() - x.min()) - 1
    y = 2 * (y - y.min()) / (y.max() - y.min()) - 1
    return tuple((float(a), float(b)) for a, b in zip(x, y))


OUTLINES["star"] = _star()
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES: dict[str, float] = {"small": 9.0, "medium": 15.0, "large": 22.0}  # half-width in px
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (32, 32), "left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46),
}
POSITION_WORDS = {"center": "in the middle", "left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom"}
PAIR_OFFSET = 15.0  # two shapes: side by side, this far left and right of the centre
PAIR_SCALE = {"small": 1.0, "medium": 0.85}  # two medium shapes are drawn smaller, to fit side by side
JITTER = {1: 0.1, 2: 0.05}  # size jitter (±share) by count: two small and two medium shapes stay apart
COUNT_WORDS = {1: "one", 2: "two"}
ATTRIBUTES = ("colour", "shape", "count", "size", "position", "background")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str = "white"
    size: str = "medium"
    position: str = "center"
    count: int = 1  # 1 or 2 (two: side by side, in the middle)
    dx: float = 0.0  # jitter in px
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        checks = ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                  (self.background, BACKGROUNDS, "background"), (self.size, SIZES, "size"),
                  (self.position, POSITIONS, "position"))
        for value, known, what in checks:
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
        if self.count not in (1, 2):
            raise ValueError(f"count must be 1 or 2, got {self.count!r}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background is invisible")

    @property
    def half(self) -> float:
        """Half-width of each shape in px."""
        return SIZES[self.size] * self.scale

    def centres(self) -> list[tuple[float, float]]:
        x, y = POSITIONS[self.position]
        x, y = x + self.dx, y + self.dy
        if self.count == 1:
            return [(x, y)]
        return [(x - PAIR_OFFSET, y), (x + PAIR_OFFSET, y)]

    def attributes(self) -> dict[str, str]:
        """What a judge of the picture should find: attribute (``ATTRIBUTES``) → word."""
        return {"colour": self.colour, "shape": self.shape, "count": COUNT_WORDS[self.count], "size": self.size,
                "position": self.position, "background": self.background}


def combination(scene: Scene) -> str:
    """The scene's combination of shape, colour, size, position and count (not its background or jitter)."""
    return f"{scene.shape}|{scene.colour}|{scene.size}|{scene.position}|{scene.count}"


def held_out(scene: Scene) -> bool:
    """Frozen (the evaluation set depends on it): one combination in eight, chosen by its SHA-256, is never a
    training picture."""
    return hashlib.sha256(combination(scene).encode()).digest()[0] % 8 == 0


def combinations(background: str = "gray") -> list[Scene]:
    """One scene (without jitter) of every combination a scene can have (``combination``), on ``background`` —
    or, for a shape of that colour, on the first background it shows on."""
    out = []
    for shape in SHAPES:
        for colour in COLOURS:
            bg = background if background != colour else next(b for b in BACKGROUNDS if b != colour)
            for count, size, position in _layouts():
                out.append(Scene(shape, colour, bg, size, position, count, scale=PAIR_SCALE[size] if count == 2
                                 else 1.0))
    return out


def _layouts() -> list[tuple[int, str, str]]:
    """(count, size, position) as scenes are drawn: large shapes and pairs in the middle; pairs small or medium."""
    singles = [(1, size, pos) for size in SIZES for pos in (POSITIONS if size != "large" else ("center",))]
    return singles + [(2, size, "center") for size in PAIR_SCALE]


def random_scene(rng: np.random.Generator, pair_share: float = 0.08, keep_held_out: bool = False) -> Scene:
    """A scene drawn from the training distribution: every shape and colour alike; large shapes and pairs only
    in the middle; pairs small or medium. Held-out combinations (``held_out``) are drawn again unless
    ``keep_held_out``."""
    while True:
        scene = _any_scene(rng, pair_share)
        if keep_held_out or not held_out(scene):
            return scene


def _any_scene(rng: np.random.Generator, pair_share: float) -> Scene:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    count = 2 if rng.random() < pair_share else 1
    size = ("small", "medium")[rng.integers(2)] if count == 2 else list(SIZES)[rng.integers(len(SIZES))]
    size_scale = PAIR_SCALE[size] if count == 2 else 1.0
    position = "center" if count == 2 or size == "large" else list(POSITIONS)[rng.integers(len(POSITIONS))]
    dx, dy = (float(v) for v in rng.uniform(-2.5, 2.5, 2))
    scale = float(rng.uniform(1 - JITTER[count], 1 + JITTER[count])) * size_scale
    return Scene(shape, colour, background, size, position, count, dx, dy, scale)


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """A boolean ``height``×``width`` mask of ``shape`` filling that box (the classifier's templates)."""
    s = SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    _draw(ImageDraw.Draw(img), shape, (width * s / 2, height * s / 2), (width * s / 2, height * s / 2), 255)
    return np.asarray(img.resize((width, height), Image.Resampling.BOX)) >= 128


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], half: tuple[float, float],
          fill: int | tuple[int, int, int]) -> None:
    (cx, cy), (hx, hy) = centre, half
    if shape == "circle":
        draw.ellipse((cx - hx, cy - hy, cx + hx, cy + hy), fill=fill)
        return
    draw.polygon([(cx + x * hx, cy + y * hy) for x, y in OUTLINES[shape]], fill=fill)


def render(scene: Scene, colour: tuple[int, int, int] | None = None,
           background: tuple[int, int, int] | None = None) -> Image.Image:
    """The scene as a 64×64 RGB picture (in other RGB colours than its names', when given: VAE training)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), background or BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for cx, cy in scene.centres():
        h = scene.half * s
        _draw(draw, scene.shape, (cx * s, cy * s), (h, h), colour or COLOURS[scene.colour])
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)
