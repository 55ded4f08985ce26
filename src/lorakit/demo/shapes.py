"""Synthetic 64-px pictures of coloured shapes with captions — the demo model's training data, and training
images for example LoRAs. Pure numpy/PIL, deterministic for a seed.

A ``Scene`` says what is drawn (shape, colour, background, size, position, one or two shapes, a small jitter);
``render(scene)`` draws it and ``caption(scene, phrasing)`` describes it, in one of ``PHRASINGS`` (the ones the
demo model is trained on: the first 8, or all with the training script's ``phrasings=12``) or ``HELD_OUT`` (phrasings
kept out of training, to test that the model generalises).
Captions name every attribute that differs from the default (medium size, in the middle); the background is named
or not.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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


def random_scene(rng: np.random.Generator, pair_share: float = 0.08) -> Scene:
    """A scene drawn from the training distribution: every shape and colour alike; large shapes and pairs only
    in the middle; pairs small or medium."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    count = 2 if rng.random() < pair_share else 1
    size = ("small", "medium")[rng.integers(2)] if count == 2 else list(SIZES)[rng.integers(len(SIZES))]
    if count == 2 and size == "medium":
        size_scale = 0.8  # two medium shapes must fit side by side
    else:
        size_scale = 1.0
    position = "center" if count == 2 or size == "large" else list(POSITIONS)[rng.integers(len(POSITIONS))]
    dx, dy = (float(v) for v in rng.uniform(-2.5, 2.5, 2))
    scale = float(rng.uniform(0.9, 1.1)) * size_scale
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


def render(scene: Scene) -> Image.Image:
    """The scene as a 64×64 RGB picture."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for cx, cy in scene.centres():
        h = scene.half * s
        _draw(draw, scene.shape, (cx * s, cy * s), (h, h), COLOURS[scene.colour])
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


# Caption templates. Fields: {np} "a small red circle" / "two red circles"; {inv} "a circle that is red";
# {colour} {shape} {shapes} {size} {bg}; {pos} " on the left" ("" in the middle, except where a template says
# "in the middle" itself).
PHRASINGS: tuple[str, ...] = (
    "{np}{pos}",
    "{np}{pos} on a {bg} background",
    "a picture of {np}{pos}",
    "{inv}{pos}",
    "{np}{pos}, {bg} background",
    "{np}{pos} on {bg}",
    "{np} {where}",
    "{a_shape} in {colour}{pos}",
    # The colour word at other places of the caption (first; after the shape; after the background), so the text
    # encoder finds it by what it is rather than where it stands.
    "{colour}: {a_shape}{pos}",
    "{a_shape} coloured {colour}{pos}",
    "{bg} background, {np}{pos}",
    "draw {np}{pos}",
)
HELD_OUT: tuple[str, ...] = (
    "{colour} {shape_s}{pos}",
    "{a_shape}, {colour}{pos}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, phrasing: str | int) -> str:
    """Describe ``scene`` with a template (a string, or an index into ``PHRASINGS``)."""
    template = PHRASINGS[phrasing] if isinstance(phrasing, int) else phrasing
    size = "" if scene.size == "medium" else scene.size + " "
    plural = scene.count == 2
    noun = scene.shape + "s" if plural else scene.shape
    described = f"{size}{scene.colour} {noun}"
    np_ = f"two {described}" if plural else f"{_article(described)} {described}"
    shape_np = f"two {size}{noun}" if plural else f"{_article(size + noun)} {size}{noun}"
    pos = "" if scene.position == "center" else " " + POSITION_WORDS[scene.position]
    fields = {
        "np": np_, "inv": f"{shape_np} that {'are' if plural else 'is'} {scene.colour}", "colour": scene.colour,
        "shape": scene.shape, "shapes": noun, "shape_s": f"{size}{noun}", "size": size,
        "bg": scene.background, "pos": pos, "where": POSITION_WORDS[scene.position], "a_shape": shape_np,
    }
    return template.format(**fields)


def training_pair(rng: np.random.Generator) -> tuple[Scene, str]:
    """A random scene and a random training caption of it."""
    scene = random_scene(rng)
    return scene, caption(scene, int(rng.integers(len(PHRASINGS))))


def with_jitter(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` moved and scaled a little (as training scenes are)."""
    dx, dy = (float(v) for v in rng.uniform(-2.5, 2.5, 2))
    return replace(scene, dx=dx, dy=dy, scale=scene.scale * float(rng.uniform(0.9, 1.1)))
