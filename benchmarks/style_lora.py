"""How far a style LoRA trained with ``lorakit train`` on the demo model moves the picture, per recipe (rank, lr,
steps, caption dropout) — the table in docs/training.md ("A style LoRA on the demo model").

The style: 8 pictures of the demo model's shapes on a magenta background (0.85, 0.2, 0.85), captioned as plain
scenes ("a red circle", …) in a kohya folder ``8_zqstyle`` (every picture has a caption, so ``zqstyle`` is not
trained). The measure: the background (border median) of 4 prompts × 2 seeds generated with the LoRA at weight 1
(Euler a, 20 steps, CFG 7, no trigger word), as the share of the way from the base model's background to the VAE's
own drawing of magenta (a round trip of the training pictures: the nearest a LoRA can get).

    python benchmarks/style_lora.py                         # the recipes of the table
    python benchmarks/style_lora.py --recipe 4,1e-3,600,0   # one: rank, lr, steps, caption dropout
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorakit.demo.captions import caption
from lorakit.demo.roundtrip import errors, picture
from lorakit.demo.shapes import COLOURS, Scene
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.models.loading import BaseModel, demo_model, place_model

MAGENTA = (217, 51, 217)  # (0.85, 0.2, 0.85)
TRAIN = [Scene(s, c, "gray", size, pos) for s, c, size, pos in (
    ("circle", "red", "medium", "center"), ("square", "blue", "small", "left"),
    ("triangle", "yellow", "large", "center"), ("diamond", "green", "medium", "top"),
    ("star", "orange", "small", "right"), ("circle", "black", "medium", "bottom"),
    ("square", "white", "large", "center"), ("star", "purple", "medium", "center"))]
PROMPTS = ("a red circle", "a small blue square on the left", "a large green triangle", "a yellow star on the right")
SEEDS = (1, 2)
RECIPES = ((4, 1e-3, 600, 0.0), (4, 2e-3, 600, 0.0), (4, 2e-3, 600, 0.1), (4, 2e-3, 1200, 0.1), (8, 2e-3, 600, 0.1))


def make_data(root: Path) -> Path:
    folder = root / "8_zqstyle"
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(TRAIN):
        picture(scene, COLOURS[scene.colour], MAGENTA).image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption(scene, 0) + "\n")
    return root


def backgrounds(gen: Generator, tag: str) -> np.ndarray:
    """(n, 3) border medians of the prompts × seeds, with ``tag`` appended to each prompt."""
    out = []
    for prompt in PROMPTS:
        for seed in SEEDS:
            rgb = np.asarray(gen(Request(f"{prompt} {tag}".strip(), seed=seed)).images[0], dtype=np.float32)
            border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                                     rgb[:, -2:].reshape(-1, 3)])
            out.append(np.median(border, axis=0))
    return np.array(out)


def vae_limit(model: BaseModel) -> float:
    """The mean RGB distance (0-1) from magenta of the VAE's round trip of the training pictures' backgrounds."""
    bg, _ = errors(model.pipe.vae, [picture(s, COLOURS[s.colour], MAGENTA) for s in TRAIN])
    return float(bg.mean())


def distance(rgb: np.ndarray) -> float:
    return float(np.linalg.norm(rgb - np.array(MAGENTA, dtype=np.float32), axis=-1).mean() / 255)


def train(data: Path, out: Path, rank: int, lr: float, steps: int, dropout: float) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(data), "-o", str(out), "--rank", str(rank),
                    "--lr", str(lr), "--steps", str(steps), "--caption-dropout", str(dropout), "--no-preview",
                    "--device", "cpu", "--dtype", "fp32"], check=True, capture_output=True)
    return time.time() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--recipe", action="append", help="rank,lr,steps,caption_dropout (repeatable)")
    a = p.parse_args(argv)
    recipes = [tuple(float(x) for x in r.split(",")) for r in a.recipe] if a.recipe else RECIPES
    torch.set_num_threads(1)
    model = place_model(demo_model(), torch.device("cpu"), torch.float32)
    model.pipe.set_progress_bar_config(disable=True)
    limit = vae_limit(model)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        loras = Path(tmp) / "loras"
        loras.mkdir()
        gen = Generator(model, Library([loras]))
        base = distance(backgrounds(gen, ""))
        print(f"background's distance from magenta: base model {base:.3f}, the VAE's round trip {limit:.3f}")
        print("| rank | lr | steps | caption dropout | distance | moved | training |")
        print("|---|---|---|---|---|---|---|")
        for rank, lr, steps, dropout in recipes:
            name = f"style_r{int(rank)}_{lr:g}_{int(steps)}_{dropout:g}"
            seconds = train(data, loras / f"{name}.safetensors", int(rank), lr, int(steps), dropout)
            gen.index.refresh()
            d = distance(backgrounds(gen, f"<lora:{name}:1>"))
            print(f"| {int(rank)} | {lr:g} | {int(steps)} | {dropout:g} | {d:.3f} | {(base - d) / (base - limit):.2f} "
                  f"| {seconds:.0f} s |", flush=True)
        gen.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
