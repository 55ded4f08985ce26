"""Full difference (``diff``, ``diff_b``) and norm layers (``w_norm``, ``b_norm``): ΔW = m·diff, Δb = m·diff_b.

``diff`` has W's shape (a Linear's (out, in) and a 1×1 conv's (out, in, 1, 1) count as the same); ``diff_b`` has
the bias's: (out,) for Full, W's own shape for norm layers (their bias is shaped like their weight).
"""
from __future__ import annotations

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from .base import Adapter, Shape, Tensor, numel, same_kernel


class Full(Adapter):
    kind = "full"
    detect = TYPE_DETECT["full"]
    keys = TYPE_LEAVES["full"]
    changes_bias = True
    weight_key = "diff"
    bias_key = "diff_b"

    def validate(self) -> None:
        self.need(self.weight_key)

    def bias_numel(self, weight_shape: Shape) -> int:
        return weight_shape[0]

    def shape_error(self, weight_shape: Shape) -> str | None:
        got = tuple(self.t[self.weight_key].shape)
        want = tuple(weight_shape)
        same = got == want or got[:2] == want[:2] and same_kernel(got[2:], want[2:])
        if not same:
            return f"{self.weight_key} is {got}, the weight is {want}"
        b = self.t.get(self.bias_key)
        if b is not None and b.numel() != self.bias_numel(want):
            return f"{self.bias_key} {tuple(b.shape)} has {b.numel()} values, the layer's bias {self.bias_numel(want)}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        return self.get(self.weight_key).reshape(weight.shape) * strength

    def bias_delta(self, strength: float) -> Tensor | None:
        b = self.f32(self.bias_key)
        return None if b is None else b.flatten() * strength


class Norm(Full):
    kind = "norm"
    detect = TYPE_DETECT["norm"]
    keys = TYPE_LEAVES["norm"]
    weight_key = "w_norm"
    bias_key = "b_norm"

    def bias_numel(self, weight_shape: Shape) -> int:
        return numel(weight_shape)
