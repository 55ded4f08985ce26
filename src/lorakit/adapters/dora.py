"""DoRA as a wrapper around another adapter's ΔW (``dora_scale`` beside LoRA/LoHa/LoKr keys).

The convention is told apart by the shape of the magnitude: ``(out, 1, …)`` or ``(out,)`` is per output row
(PEFT, LyCORIS since Dec 2024), ``(1, in, …)`` per input column (older LyCORIS). Tools that assume one of them
scramble the other silently; we never guess from anything but the shape, and refuse any other shape.
"""
from __future__ import annotations

from ..keymap.leaves import TYPE_LEAVES
from . import functional as fn
from .base import Adapter, Pieces, Shape, Tensor, Wrapper, gather_rows, weight_kind_error


class DoRA(Wrapper):
    needs_weight = True
    kind = "dora"
    keys = TYPE_LEAVES["dora"]

    def __init__(self, inner: Adapter, magnitude: Tensor, where: str) -> None:
        self.inner = inner
        super().__init__({"dora_scale": magnitude}, where)

    def validate(self) -> None:
        m = self.magnitude
        axis = 0 if self.per_output else 1
        if m.dim() > 1 and any(s != 1 for i, s in enumerate(m.shape) if i != axis):
            raise self.fail(f"dora_scale must be (out, 1, …) per output or (1, in, …) per input, got shape "
                            f"{tuple(m.shape)}")

    @property
    def magnitude(self) -> Tensor:
        return self.t["dora_scale"]

    @property
    def per_output(self) -> bool:
        """(out, 1, …) or (out,) → per output; (1, in, …) → per input. Dialect readers whose magnitudes mean per
        output whatever their shape (PEFT's conv ``(1, out, 1, 1)``) reshape them to (out, 1) first."""
        m = self.magnitude
        return m.dim() <= 1 or m.shape[0] != 1 or m.shape[1] == 1

    @property
    def kind_name(self) -> str:
        return f"dora({self.inner_kind})"

    def widths(self) -> tuple[int | None, int | None]:
        return self.inner.widths()

    def rows(self, pieces: Pieces, where: str) -> "DoRA | None":
        """Per-output magnitudes normalise each row alone: its rows and the inner adapter's rows. A per-input
        magnitude normalises each column over *all* rows of the fused weight, so no part can be done alone."""
        inner = self.inner.rows(pieces, where) if self.per_output else None
        if inner is None:
            return None
        return DoRA(inner, gather_rows(self.magnitude.reshape(self.magnitude.shape[0], -1), pieces), where)

    def shape_error(self, weight_shape: Shape) -> str | None:
        err = self.inner.shape_error(weight_shape) or weight_kind_error("DoRA", weight_shape)
        if err:
            return err
        axis = 0 if self.per_output else 1
        if self.magnitude.numel() != weight_shape[axis]:
            side = "output" if self.per_output else "input"
            return f"dora_scale {tuple(self.magnitude.shape)} ({side} convention) does not fit the weight " \
                   f"{tuple(weight_shape)}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        inner = self.inner.delta(weight, 1.0, dyn)
        return fn.dora_delta(weight, inner, self.get("dora_scale"), self.per_output, strength)
