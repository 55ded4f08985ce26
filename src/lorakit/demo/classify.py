"""Judge a picture of the demo model's world: every attribute its captions name. Pure numpy/PIL.

- background: the median colour of the 2-px border, named by the nearest of ``BACKGROUNDS`` — "other" when it is
  more than ``BACKGROUND_TOLERANCE`` away from all (a pink or green field is no white or black background);
- the shapes: 4-connected regions of pixels more than ``DIFFERS`` away from the background; a region counts when
  it has ``MIN_PIXELS`` and at least ``MIN_SHARE`` of the largest one's pixels (specks are not shapes);
- count: how many regions count ("one", "two"; "none", or the number when there are more);
- colour: the palette colour nearest the regions' median colour (their inner pixels, when they have some);
- shape: the template (``shapes.shape_mask``) that, stretched over the largest region's bounding box, overlaps it
  best (IoU);
- size: the largest region's half-width (half the longer side of its box) against the sizes a scene of that count
  is drawn at (two medium shapes are drawn smaller);
- position: the centre of the box around all counted regions (every outline fills its box, so this is the
  scene's centre for any shape), named by the nearest of ``POSITIONS``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import BACKGROUNDS, COLOURS, COUNT_WORDS, PAIR_SCALE, POSITIONS, SHAPES, SIZES, shape_mask

DIFFERS = 60.0  # RGB distance from the background that makes a pixel part of a shape
MIN_PIXELS = 12  # a smaller region is no shape
MIN_SHARE = 0.3  # nor is one under this share of the largest
BACKGROUND_TOLERANCE = 60.0  # RGB distance
# Half-widths (px) per count: a judged size is the nearest.
SIZE_BY_COUNT = {1: SIZES, 2: {s: SIZES[s] * f for s, f in PAIR_SCALE.items()}}
_FILL = {s: float(shape_mask(s, 64, 64).mean()) for s in SHAPES}  # the share of its box each shape fills


@dataclass(frozen=True)
class Judgement:
    colour: str | None  # None: no shape found
    shape: str | None
    count: str  # "one", "two", "none", or the number of shapes found
    size: str | None
    position: str | None
    background: str  # the nearest of BACKGROUNDS, or "other"
    background_rgb: tuple[int, int, int]
    pixels: int  # size of the largest shape's region
    iou: float  # how well the best template matches it (0..1)

    def attributes(self) -> dict[str, str | None]:
        """Attribute (``shapes.ATTRIBUTES``) → the word judged."""
        return {"colour": self.colour, "shape": self.shape, "count": self.count, "size": self.size,
                "position": self.position, "background": self.background}


def classify(image: Image.Image) -> Judgement:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    bg_rgb = _border_colour(rgb)
    background = _nearest(bg_rgb, BACKGROUNDS)
    if np.linalg.norm(bg_rgb - np.array(BACKGROUNDS[background], dtype=np.float32)) > BACKGROUND_TOLERANCE:
        background = "other"
    bg = (int(bg_rgb[0]), int(bg_rgb[1]), int(bg_rgb[2]))
    regions = _regions(np.linalg.norm(rgb - bg_rgb, axis=-1) > DIFFERS)
    if not regions:
        return Judgement(None, None, "none", None, None, background, bg, 0, 0.0)
    largest = regions[0]
    shape, iou = _shape_of(largest)
    union = np.logical_or.reduce(regions)
    count = COUNT_WORDS.get(len(regions), str(len(regions)))
    return Judgement(_colour_of(rgb, union), shape, count, _size_of(largest, shape, len(regions)), _position_of(union),
                     background, bg, int(largest.sum()), iou)


def _border_colour(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the 2-px border."""
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                             rgb[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [float(np.linalg.norm(rgb - np.array(palette[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(distances))]


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """The regions that count as shapes (``MIN_PIXELS``, ``MIN_SHARE``), largest first."""
    found = sorted(_components(mask), key=lambda r: -int(r.sum()))
    if not found:
        return []
    floor = max(MIN_PIXELS, MIN_SHARE * float(found[0].sum()))
    return [r for r in found if r.sum() >= floor]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of ``mask``."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    current = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
    return [labels == i for i in range(1, current + 1)]


def _colour_of(rgb: np.ndarray, region: np.ndarray) -> str:
    """The palette colour nearest the region's median colour (its inner pixels, when it has some)."""
    inner = region.copy()
    inner[1:-1, 1:-1] &= region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
    return _nearest(np.median(rgb[inner if inner.sum() >= 4 else region], axis=0), COLOURS)


def _box(region: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the region's bounding box, inclusive."""
    ys, xs = np.nonzero(region)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def _shape_of(region: np.ndarray) -> tuple[str, float]:
    """The shape whose template, stretched over the region's bounding box, overlaps it best (IoU)."""
    y0, x0, y1, x1 = _box(region)
    box = region[y0:y1 + 1, x0:x1 + 1]
    h, w = box.shape
    scores = {}
    for shape in SHAPES:
        template = shape_mask(shape, w, h)
        union = np.logical_or(template, box).sum()
        scores[shape] = float(np.logical_and(template, box).sum() / union) if union else 0.0
    best = max(scores, key=lambda s: scores[s])
    return best, scores[best]


def _size_of(region: np.ndarray, shape: str, count: int) -> str | None:
    """The size whose half-width is nearest the region's: from its box, or from its area for the share of its
    box the shape fills (thin tips fall below ``DIFFERS`` and shrink the box), whichever is larger."""
    if count not in SIZE_BY_COUNT:
        return None
    y0, x0, y1, x1 = _box(region)
    from_area = float(np.sqrt(region.sum() / _FILL[shape])) / 2
    half = max(max(y1 - y0 + 1, x1 - x0 + 1) / 2, from_area)
    sizes = SIZE_BY_COUNT[count]
    return min(sizes, key=lambda s: abs(sizes[s] - half))


def _position_of(union: np.ndarray) -> str:
    y0, x0, y1, x1 = _box(union)
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
