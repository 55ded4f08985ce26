"""Judge a generated picture of a shape: its background colour (from the border), the main shape (the largest
connected region of pixels that differ from the background), that shape's colour (nearest of the palette) and
its kind (the shape template that best matches it inside its bounding box, by IoU). Pure numpy/PIL."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import COLOURS, SHAPES, shape_mask

DIFFERS = 60.0  # RGB distance from the background that makes a pixel part of a shape
MIN_PIXELS = 12  # a smaller region is no shape


@dataclass(frozen=True)
class Judgement:
    colour: str | None  # None: no shape found
    shape: str | None
    background: tuple[int, int, int]
    pixels: int  # size of the main shape's region
    iou: float  # how well the best template matches (0..1)


def classify(image: Image.Image) -> Judgement:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = _background(rgb)
    differs = np.linalg.norm(rgb - background, axis=-1) > DIFFERS
    region = _largest_region(differs)
    bg = tuple(int(v) for v in background)
    if region.sum() < MIN_PIXELS:
        return Judgement(None, None, bg, int(region.sum()), 0.0)  # type: ignore[arg-type]
    shape, iou = _shape_of(region)
    return Judgement(_colour_of(rgb, region), shape, bg, int(region.sum()), iou)  # type: ignore[arg-type]


def _background(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the 2-px border."""
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                             rgb[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask``."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _colour_of(rgb: np.ndarray, region: np.ndarray) -> str:
    """The palette colour nearest the region's median colour (its inner pixels, when it has some)."""
    inner = region.copy()
    inner[1:-1, 1:-1] &= region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
    pixels = rgb[inner if inner.sum() >= 4 else region]
    median = np.median(pixels, axis=0)
    names = list(COLOURS)
    distances = [float(np.linalg.norm(median - np.array(COLOURS[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(distances))]


def _shape_of(region: np.ndarray) -> tuple[str, float]:
    """The shape whose template, stretched over the region's bounding box, overlaps it best (IoU)."""
    ys, xs = np.nonzero(region)
    box = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    scores = {}
    for shape in SHAPES:
        template = shape_mask(shape, w, h)
        union = np.logical_or(template, box).sum()
        scores[shape] = float(np.logical_and(template, box).sum() / union) if union else 0.0
    best = max(scores, key=lambda s: scores[s])
    return best, scores[best]
