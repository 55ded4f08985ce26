"""What ``bake`` needs for FLUX.1: the other parts of a fused layer whose change reads the whole fused weight (they
stand beside the part being patched, so it reads the same originals ``apply_loras`` gives it), and a BFL file's
fused tensor put back together from its patched parts."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters import Rows
from ..layout import origin_of
from ..lora_model import LoraModel

Pieces = tuple[tuple[int, int], ...]


def fused_siblings(path: str, loras: Sequence[LoraModel]) -> list[str]:
    """The model modules besides ``path`` whose original weights a LoRA's change of ``path`` reads (the parts of a
    fused layer, for the types whose ΔW depends on the fused weight: per-input DoRA, OFT, GLoRA…)."""
    out: list[str] = []
    for lora in loras:
        adapter = lora.layers.get(path)
        origin = origin_of(adapter) if adapter is not None else None
        if isinstance(adapter, Rows) and adapter.needs_weight and origin is not None:
            out += [p for p in origin.parts if p != path and p not in out]
    return out


def scatter_rows(parts: Sequence[tuple[Pieces, torch.Tensor]]) -> torch.Tensor:
    """The file tensor whose row ranges ``pieces`` hold each part's rows, in order (the inverse of ``Ref.rows``)."""
    total = sum(b - a for pieces, _ in parts for a, b in pieces)
    first = parts[0][1]
    out = first.new_empty((total, *first.shape[1:]))
    for pieces, t in parts:
        start = 0
        for a, b in pieces:
            out[a:b] = t[start:start + b - a]
            start += b - a
    return out
