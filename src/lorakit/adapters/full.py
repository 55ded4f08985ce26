"""Full difference (``diff``, ``diff_b``) and norm layers (``w_norm``, ``b_norm``): ΔW = m·diff."""
from __future__ import annotations

import torch

from .base import Adapter, Tensor


class Full(Adapter):
    kind = "full"
    detect = ("diff",)
    keys = ("diff", "diff_b")
    changes_bias = True
    weight_key = "diff"
    bias_key = "diff_b"

    def validate(self) -> None:
        self.need(self.weight_key)

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        got = self.t[self.weight_key].shape
        if got.numel() != weight_shape.numel():
            return f"{self.weight_key} is {tuple(got)}, the weight is {tuple(weight_shape)}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        return self.t[self.weight_key].float().reshape(weight.shape) * strength

    def bias_delta(self, strength: float) -> Tensor | None:
        b = self.t.get(self.bias_key)
        return None if b is None else b.float() * strength


class Norm(Full):
    kind = "norm"
    detect = ("w_norm",)
    keys = ("w_norm", "b_norm")
    weight_key = "w_norm"
    bias_key = "b_norm"
