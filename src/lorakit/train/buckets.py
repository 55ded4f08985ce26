"""Aspect-ratio buckets (kohya's ``--enable_bucket``): sizes in 64-px steps whose area is at most the training
resolution², each image resized to cover its bucket and centre-cropped."""
from __future__ import annotations

import math
from pathlib import Path

import torch

STEP = 64
MAX_RESOLUTION = 8192  # 8192² = 64 MP, the largest image training takes; the buckets are listed side by side


def bucket_sizes(resolution: int, step: int = STEP) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, area ≤ resolution², sides ≤ 2·resolution, aspect ≤ 4."""
    if resolution < step or resolution % step or resolution > MAX_RESOLUTION:
        from ..errors import TrainingError

        raise TrainingError(f"--resolution must be a multiple of {step} from {step} to {MAX_RESOLUTION}, got "
                            f"{resolution}")
    area = resolution * resolution
    out = []
    for w in range(step, 2 * resolution + 1, step):
        h = min(2 * resolution, (area // w) // step * step)
        if h >= step and max(w, h) / min(w, h) <= 4:
            out.append((w, h))
    return sorted(set(out))


def choose(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log) to the image's; the larger one on a tie."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def load_pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The image as (3, h, w) fp32 in [-1, 1]: resized to cover ``size`` (Lanczos), centre-cropped."""
    import numpy as np
    from PIL import Image

    w, h = size
    with Image.open(path) as src:
        rgb = src.convert("RGB")
    scale = max(w / rgb.width, h / rgb.height)
    rw, rh = max(w, round(rgb.width * scale)), max(h, round(rgb.height * scale))
    left, top = (rw - w) // 2, (rh - h) // 2
    crop = rgb.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + w, top + h))
    arr = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
