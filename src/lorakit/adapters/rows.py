"""Part of a fused layer: a module of the model that is some rows of one layer of the file (FLUX's ``qkv`` is
``to_q``/``to_k``/``to_v``; its final adaLN is ``norm_out.linear`` with the halves swapped).

``split_rows`` gives each part the exact adapter of its rows: the type's own (``Adapter.rows``: LoRA shares
``down`` and takes rows of ``up``, so α/r stays the fused file's) where the type can say it, else ``Rows``, which
computes the fused ΔW and takes the rows — LoKr makes only the rows it needs; a type whose ΔW reads W (per-input
DoRA normalises columns over every fused row, OFT rotates across parts, GLoRA, IA3) reads the fused original
weight, rebuilt from the originals of every part (``bind``: the patcher says where the originals are).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from ..errors import LorakitError
from .base import Adapter, Pieces, Shape, Tensor, Wrapper, gather_rows

Originals = Callable[[str], Tensor]  # canonical module path → its original weight (any dtype, any device)
Parts = tuple[tuple[str, Pieces], ...]  # every part of a fused layer: (canonical module path, its row ranges)


def split_rows(adapter: Adapter, parts: Parts, fused_rows: int) -> dict[str, Adapter]:
    """Each part's adapter (rows of ``adapter``, a layer of ``fused_rows`` rows)."""
    out: dict[str, Adapter] = {}
    for path, pieces in parts:
        native = adapter.rows(pieces, path)
        out[path] = native if native is not None else Rows(adapter, pieces, fused_rows, parts, path)
    return out


class Rows(Wrapper):
    """Rows ``pieces`` of what ``inner`` does to the fused weight (``fused_rows`` rows, the part's columns)."""

    kind = "rows"

    def __init__(self, inner: Adapter, pieces: Pieces, fused_rows: int, parts: Parts, where: str) -> None:
        self.inner = inner
        self.pieces = pieces
        self.fused_rows = fused_rows
        self.parts = parts
        self.originals: Originals | None = None
        self.needs_weight = inner.needs_weight  # type: ignore[misc]
        self.changes_bias = inner.changes_bias  # type: ignore[misc]
        super().__init__({}, where)

    @property
    def kind_name(self) -> str:
        return self.inner_kind

    @property
    def out_rows(self) -> int:
        return sum(b - a for a, b in self.pieces)

    def widths(self) -> tuple[int | None, int | None]:
        return self.out_rows, self.inner.widths()[1]

    def bind(self, originals: Originals) -> "Rows":
        """A copy that reads the parts' original weights through ``originals`` (for types whose ΔW reads W)."""
        bound = copy.copy(self)
        bound.originals = originals
        return bound

    def shape_error(self, weight_shape: Shape) -> str | None:
        if weight_shape[0] != self.out_rows:
            return f"it is {self.out_rows} rows of a fused layer, the weight has {weight_shape[0]}"
        return self.inner.shape_error((self.fused_rows, *weight_shape[1:]))

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        fused_shape = (self.fused_rows, *weight.shape[1:])
        if not self.needs_weight:
            return self.inner.delta_rows(self.pieces, fused_shape, strength, dyn).reshape(weight.shape)
        fused = self.inner.delta(self._fused_weight(weight), strength, dyn)
        return gather_rows(fused, self.pieces).clone()  # not a view that keeps the fused ΔW alive

    def bias_delta(self, strength: float) -> Tensor | None:
        b = self.inner.bias_delta(strength)
        return None if b is None else gather_rows(b, self.pieces).clone()

    def _fused_weight(self, weight: Tensor) -> Tensor:
        """The fused original weight, fp32 on ``weight``'s device: each part's original rows where they belong."""
        if self.originals is None:
            raise LorakitError(f"layer {self.where}: a {self.kind_name} change on a fused layer needs the original "
                               "weights of all its parts (a patcher binds them)")
        fused = torch.empty((self.fused_rows, *weight.shape[1:]), dtype=torch.float32, device=weight.device)
        for path, pieces in self.parts:
            original = self.originals(path).to(device=weight.device, dtype=torch.float32)
            start = 0
            for a, b in pieces:
                fused[a:b] = original[start:start + b - a]
                start += b - a
        return fused
