"""``merge`` on FLUX.1: a concat merge keeps the fused layers of the BFL layout whole.

Per model module, concat stacks the inputs' factors (``merge._concat_plain``). For the parts of a fused BFL layer
(``qkv``, ``linear1``, the final adaLN) this writes one fused LoRA instead, exactly: its rank axis holds one block
per distinct ``down`` — a fused layer read from a kohya file is one block for all its parts (the parts share that
down), a part trained alone (diffusers/PEFT files) is a block of its own with zero rows elsewhere. With cᵢ the
weight times the input's α/r (split as √|cᵢ| on both factors, the sign on up) and α = the total rank, applying the
file at 1.0 adds Σ mᵢ·ΔWᵢ on every part. A fused layer some of whose parts no input has stays per module (the
rows of the missing parts have no width here) and is written under diffusers names.

``svd`` merges run per model module with ``base`` binding the parts of a fused layer whose change reads the whole
fused weight (per-input DoRA, OFT, GLoRA on ``qkv``) to the base model's weights.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ..adapters import Rows
from ..errors import ToolError
from ..keymap.families import FLUX1, Family
from ..keymap.layouts import Fused
from .layers import Contribution, lora_leaves
from .modelfile import ModelFile
from .report import LayerResult, ToolReport
from .svd import factor_error2

Tensor = torch.Tensor
Layers = dict[str, list[Contribution]]


@dataclasses.dataclass
class _Block:
    """One stretch of the fused rank axis: a down (r, in) and coefficient, and the up rows (dᵢ, r) of the parts
    it has."""

    down: Tensor
    coef: float
    ups: dict[int, Tensor]
    key: tuple[int, float, int | None]


def concat_fused(layers: Layers, dtype: torch.dtype, report: ToolReport, family: Family = FLUX1
                 ) -> tuple[dict[str, dict[str, Tensor]], Layers]:
    """The fused layers of ``family``'s original layout (FLUX.1's BFL, SD3's SAI) whose every part is in ``layers``
    with plain LoRA contributions, concatenated whole (original paths); and the layers left for the per-module
    concat."""
    layout, denoiser = family.layout, family.denoiser
    if layout is None:
        return {}, dict(layers)
    homes: dict[str, tuple[Fused, dict[int, str]]] = {}
    for path, contribs in layers.items():
        component, _, module = path.partition(".")
        home = layout.fused_home(module) if component == denoiser else None
        if home is not None and all(c.kind == "lora" for c in contribs):
            homes.setdefault(home[0], (home[1], {}))[1][home[2]] = path
    out: dict[str, dict[str, Tensor]] = {}
    rest = dict(layers)
    for bfl, (fused, parts) in sorted(homes.items()):
        if len(parts) == len(fused.targets):
            paths = [parts[i] for i in range(len(parts))]
            out[f"{denoiser}.{bfl}"] = _fuse(f"{denoiser}.{bfl}", [layers[p] for p in paths], fused, dtype, report)
            for p in paths:
                del rest[p]
    return out, rest


def fused_layer(path: str, family: Family = FLUX1) -> str | None:
    """The fused layer of ``family``'s original layout (FLUX.1's ``transformer.double_blocks.0.img_attn.qkv``) a
    model path is some rows of, if any."""
    component, _, module = path.partition(".")
    home = family.layout.fused_home(module) if family.layout is not None and component == family.denoiser else None
    return f"{family.denoiser}.{home[0]}" if home is not None else None


def _blocks(parts: Sequence[list[Contribution]]) -> list[_Block]:
    """Contributions grouped by the down they share (the same tensor, weight and DyLoRA rank)."""
    blocks: list[_Block] = []
    for i, contribs in enumerate(parts):
        for c in contribs:
            up, down, _ = c.adapter._factors(c.dyn)  # type: ignore[attr-defined]
            key = (id(c.adapter.t["lora_down.weight"]), c.strength, c.dyn)
            home = next((b for b in blocks if b.key == key and i not in b.ups), None)
            if home is None:
                home = _Block(down, c.strength * c.adapter.scale(), {}, key)
                blocks.append(home)
            home.ups[i] = up
    return blocks


def _fuse(path: str, parts: Sequence[list[Contribution]], fused: Fused, dtype: torch.dtype,
          report: ToolReport) -> dict[str, Tensor]:
    """One LoRA (up (Σdᵢ, R), down (R, in), α = R) adding Σ cᵢ·ΔWᵢ on every part of a fused layer."""
    widths = [int(cs[0].adapter.t["lora_up.weight"].shape[0]) for cs in parts]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    blocks = _blocks(parts)
    shapes = {(i, int(u.shape[0]), int(b.down.shape[1])) for b in blocks for i, u in b.ups.items()}
    if len({s[2] for s in shapes}) > 1 or any(w != widths[i] for i, w, _ in shapes):
        sources = ", ".join(sorted({c.source for cs in parts for c in cs}))
        raise ToolError(f"layer {path}: the inputs ({sources}) give its parts different shapes: LoRAs for different "
                        "models")
    rank = sum(int(b.down.shape[0]) for b in blocks)
    up = torch.zeros(sum(widths), rank, dtype=torch.float64)
    ref_up, downs, ref_downs, col = up.clone(), [], [], 0
    for b in blocks:
        r, root = int(b.down.shape[0]), math.sqrt(abs(b.coef))
        for i, u in b.ups.items():
            rows = slice(starts[i], starts[i] + widths[i])
            up[rows, col:col + r] = u.double() * math.copysign(root, b.coef)
            ref_up[rows, col:col + r] = u.double() * b.coef
        downs.append((b.down.double() * root).to(dtype))
        ref_downs.append(b.down.double())
        col += r
    if fused.swapped(sum(widths), int(blocks[0].down.shape[1])):  # diffusers' [scale; shift] → [shift; scale]
        up, ref_up = (torch.cat(t.chunk(2)[::-1]) for t in (up, ref_up))
    stored_up, stored_down = up.to(dtype), torch.cat(downs)
    err2, norm2 = factor_error2(ref_up, torch.cat(ref_downs), stored_up, stored_down)
    kinds = "+".join(sorted({c.kind for cs in parts for c in cs}))
    report.add(LayerResult(path, f"{kinds} (fused)", rank, norm2, err2))
    return lora_leaves(stored_up, stored_down, rank, (sum(widths), int(stored_down.shape[1])))


def bind_parts(contribs: Sequence[Contribution], base: ModelFile | None) -> list[Contribution]:
    """Parts of a fused layer whose change reads the whole fused weight, bound to ``base``'s weights (unbound
    without a base: ``dense_delta`` then asks for ``--base``)."""
    if base is None:
        return list(contribs)
    def load(path: str) -> Tensor:
        if path + ".weight" not in base.params:
            raise ToolError(f"{base.path}: no {path} in the base model; a part of a fused layer the LoRA changes")
        return base.values(path + ".weight")  # an fp8 base's weight dequantized

    return [dataclasses.replace(c, adapter=c.adapter.bind(load))
            if isinstance(c.adapter, Rows) and c.adapter.needs_weight else c for c in contribs]
