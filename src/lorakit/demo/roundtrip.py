"""How faithfully a VAE draws flat colours: pictures of a shape in one RGB colour on another go through
encode → decode (the posterior mean), and the median colour of the background (away from the shape) and of the
shape's inside come back this far from what went in — Euclidean distance in RGB scaled to [0, 1]."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .shapes import Scene, random_scene, render


@dataclass(frozen=True)
class Picture:
    image: Image.Image
    colour: tuple[int, int, int]
    background: tuple[int, int, int]
    inside: np.ndarray  # (64, 64) bool: well inside the shape(s)
    outside: np.ndarray  # well away from them


def picture(scene: Scene, colour: tuple[int, int, int], background: tuple[int, int, int]) -> Picture:
    mask = np.asarray(render(scene, (255, 255, 255), (0, 0, 0)).convert("L")) > 127
    return Picture(render(scene, colour, background), colour, background, _eroded(mask, 2), ~_dilated(mask, 3))


def random_pictures(n: int, seed: int = 0) -> list[Picture]:
    """``n`` pictures of the renderer's scenes in random RGB colours at least 40 apart."""
    rng = np.random.default_rng(seed)
    out: list[Picture] = []
    while len(out) < n:
        scene = random_scene(rng, pair_share=0.15, keep_held_out=True)
        fg, bg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        if np.linalg.norm(np.subtract(fg, bg)) >= 40:
            out.append(picture(scene, fg, bg))  # type: ignore[arg-type]
    return out


def errors(vae: Any, pictures: list[Picture]) -> tuple[np.ndarray, np.ndarray]:
    """(background errors, shape errors), one per picture, in [0, √3]; the pictures go in on the VAE's device and
    dtype (a diffusers VAE's ``device``/``dtype``; CPU fp32 for an object without them)."""
    import torch

    x = np.stack([np.asarray(p.image, dtype=np.float32) for p in pictures]) / 127.5 - 1
    device, dtype = getattr(vae, "device", torch.device("cpu")), getattr(vae, "dtype", torch.float32)
    with torch.no_grad():
        tensor = torch.from_numpy(x).permute(0, 3, 1, 2).to(device, dtype)
        out = [vae.decode(vae.encode(tensor[i:i + 32]).latent_dist.mean).sample.float().cpu()
               for i in range(0, len(x), 32)]
    rec = ((torch.cat(out).clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    bg = [_distance(r[p.outside], p.background) for r, p in zip(rec, pictures)]
    fg = [_distance(r[p.inside], p.colour) for r, p in zip(rec, pictures)]
    return np.array(bg), np.array(fg)


def _distance(pixels: np.ndarray, colour: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.median(pixels, axis=0) - np.array(colour, dtype=np.float32)) / 255)


def _eroded(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(k):
        inner = out.copy()
        inner[1:-1, 1:-1] &= out[:-2, 1:-1] & out[2:, 1:-1] & out[1:-1, :-2] & out[1:-1, 2:]
        inner[[0, -1], :] = False
        inner[:, [0, -1]] = False
        out = inner
    return out if out.any() else mask


def _dilated(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(k):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out

