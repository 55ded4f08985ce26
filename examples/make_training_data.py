"""The training images of the example LoRAs (deterministic; 16 images each, 64 px, kohya layout with captions):

- ``examples/train/sunset/4_sunset/``: the demo model's shapes as black silhouettes on orange ("sunset"),
  whatever colour and background the caption names; captions ``sunset, <the scene's caption>``;
- ``examples/train/blueprint/4_blueprint/``: the shapes in white on blue ("blueprint");
  captions ``blueprint, <the scene's caption>``.

(The colours are the demo model's own orange, black, white and blue: its small VAE draws those well.)

    python examples/make_training_data.py          # then examples/train_example_loras.sh

Each style has a statistic that measures it on any image (``warmth``: mean (R − B)/255; ``blueness``:
mean (B − max(R, G))/255), used by the tests and docs to show that a LoRA's effect grows with its weight.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.demo.captions import PHRASINGS, caption
from lorakit.demo.shapes import BACKGROUNDS, Scene, random_scene, render

ROOT = Path(__file__).resolve().parent / "train"
SUNSET_BG = (250, 140, 0)  # the demo model's "orange" — its VAE draws its own colours well
SUNSET_SHAPE = (15, 15, 15)  # its "black"
BLUEPRINT_BG = (30, 70, 220)  # its "blue"
BLUEPRINT_LINE = (245, 245, 245)
COUNT = 16


def _mask(scene: Scene) -> np.ndarray:
    """Where the scene's shapes are (rendered once on a known background)."""
    arr = np.asarray(render(scene), dtype=np.int16)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    return np.abs(arr - bg).sum(axis=2) > 60


def sunset(scene: Scene) -> Image.Image:
    mask = _mask(scene)
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[:] = SUNSET_BG
    out[mask] = SUNSET_SHAPE
    return Image.fromarray(out)


def blueprint(scene: Scene) -> Image.Image:
    mask = _mask(scene)
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[:] = BLUEPRINT_BG
    out[mask] = BLUEPRINT_LINE
    return Image.fromarray(out)


def warmth(image: Image.Image) -> float:
    """Mean of (R − B)/255 over all pixels (the sunset style's orange background raises it)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((arr[..., 0] - arr[..., 2]).mean() / 255.0)


def blueness(image: Image.Image) -> float:
    """Mean of (B − max(R, G))/255 over all pixels (the blueprint style's blue background raises it)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((arr[..., 2] - arr[..., :2].max(axis=2)).mean() / 255.0)


STYLES = {"sunset": ("sunset", sunset), "blueprint": ("blueprint", blueprint)}


def make(name: str, seed: int) -> Path:
    trigger, draw = STYLES[name]
    folder = ROOT / name / f"4_{trigger}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(COUNT):
        scene = random_scene(rng, pair_share=0.0)
        draw(scene).save(folder / f"{i:02d}.png")
        text = caption(scene, PHRASINGS[0]).replace(f" on a {scene.background} background", "")
        (folder / f"{i:02d}.txt").write_text(f"{trigger}, {text}\n")
    return folder


def main() -> None:
    for seed, name in enumerate(STYLES):
        print(make(name, 1000 + seed))


if __name__ == "__main__":
    sys.exit(main())
