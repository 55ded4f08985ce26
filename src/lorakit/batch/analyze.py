"""The block-effect analyzer (as lora-block-weight's "Effective Block Analyzer"): generate with a LoRA at full
strength, then once per block with that block lowered (to ``off``, 0 by default), and rank blocks by how much the
image changed.

Effect of a block = mean |full − lowered| over every pixel and channel, in 0–255 units (the max is reported too).
Blocks are lora-block-weight ids (``BASE`` = the text encoder, ``IN00``…``IN11``, ``M00``, ``OUT00``…``OUT11``;
SDXL up to ``IN08``/``OUT08``); every block is set through a full lbw vector (26 values for SD1/SD2, 20 for SDXL),
whose ``BASE`` also carries the UNet layers outside every block (time embeddings). By default the blocks are those
the LoRA has layers in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import GridError
from ..files.output import write_atomic
from ..generate.pipeline import Generator, Request
from ..keymap import block_id
from ..keymap.families import unet_last_out, unet_vector
from ..lora_model import load_cached
from .axes import num, set_lora_args
from .common import Progress
from .draw import draw_grid
from .grid import fix_seed, preflight_requests


@dataclass(frozen=True)
class BlockEffect:
    block: str
    mean: float  # mean |Δ| over pixels and channels, 0–255
    max: int  # largest |Δ| of any pixel channel


@dataclass
class Analysis:
    lora: str
    off: float
    effects: list[BlockEffect]  # ranked: largest mean first (ties: block order)
    images: dict[str, Image.Image]  # "full" and each block id → its image

    def table(self) -> str:
        lines = [f"block effects of {self.lora} (each block set to {num(self.off)}; mean |Δ| of 0–255 pixels):",
                 f"{'rank':>4}  {'block':<6} {'mean Δ':>8} {'max Δ':>6}"]
        lines += [f"{i:>4}  {e.block:<6} {e.mean:8.3f} {e.max:6d}" for i, e in enumerate(self.effects, 1)]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {"schema": "lorakit.analyze/1", "lora": self.lora, "off": self.off,
                "ranking": [{"block": e.block, "mean": e.mean, "max": e.max} for e in self.effects]}


def vector_names(arch: str) -> list[str]:
    """The block ids of the full UNet lbw vector for ``arch`` (20 for SDXL, else 26): the family's data."""
    return list(unet_vector(arch).blocks)


def lora_blocks(gen: Generator, name: str) -> list[str]:
    """The blocks LoRA ``name`` has layers in, in vector order (layers outside every block count as BASE)."""
    lora = load_cached(str(gen.index.resolve(name).path))
    arch = gen.model.arch
    names = vector_names(arch)
    touched = {block_id(path, last_out=unet_last_out(arch)) or "BASE" for path in lora.layers}
    return [b for b in names if b in touched]


def analyze(gen: Generator, base: Request, name: str, blocks: list[str] | None = None, off: float = 0.0,
            progress: Progress | None = None) -> Analysis:
    """Rank ``blocks`` (default: the LoRA's own) of LoRA ``name`` by their effect on ``base``'s image."""
    names = vector_names(gen.model.arch)
    chosen = lora_blocks(gen, name) if blocks is None else [b.strip().upper() for b in blocks]
    unknown = [b for b in chosen if b not in names]
    if unknown or not chosen:
        raise GridError(f"--blocks: {', '.join(unknown) or 'no block'} is not a block of this model; blocks: "
                        f"{', '.join(names)}")
    base = fix_seed(replace(base, batch=1))
    variants = {"full": _with_vector(base, name, names, None, off)}
    variants.update({b: _with_vector(base, name, names, b, off) for b in chosen})
    preflight_requests(gen, list(variants.values()))
    images = {}
    for label, req in variants.items():
        images[label] = gen(req).images[0]
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.close()
    full = np.asarray(images["full"], dtype=np.int16)
    effects = []
    for b in chosen:
        delta = np.abs(np.asarray(images[b], dtype=np.int16) - full)
        effects.append(BlockEffect(b, float(delta.mean()), int(delta.max())))
    ranked = sorted(effects, key=lambda e: -e.mean)  # stable: ties keep block order
    return Analysis(name, off, ranked, images)


def _with_vector(base: Request, name: str, names: list[str], lowered: str | None, off: float) -> Request:
    vector = ",".join(num(off) if b == lowered else "1" for b in names)
    return set_lora_args(base, name, {"lbw": vector})


def save_analysis(analysis: Analysis, path: Path) -> None:
    """One row: the full image, then each block lowered, labelled with its effect; ranking in the PNG text."""
    # the bundled font has no Greek: "diff", not a delta sign
    labels = ["all blocks"] + [f"{e.block}={num(analysis.off)} diff {e.mean:.2f}" for e in analysis.effects]
    images = [analysis.images["full"]] + [analysis.images[e.block] for e in analysis.effects]
    grid, layout = draw_grid([images], labels, None, f"block effects of {analysis.lora}")
    info = PngInfo()
    info.add_text("lorakit analyze", json.dumps({**analysis.as_dict(), **layout.as_dict()}))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
