"""IA3: ΔW = W ⊙ w along the input (``on_input``) or output axis."""
from __future__ import annotations

import torch

from . import functional as fn
from .base import Adapter, Tensor


class IA3(Adapter):
    needs_weight = True
    kind = "ia3"
    detect = ("on_input",)
    keys = ("weight", "on_input")

    def validate(self) -> None:
        self.need("weight", "on_input")

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        n = self.t["weight"].numel()
        axis = 1 if bool(self.t["on_input"]) else 0
        if len(weight_shape) < 2 or weight_shape[axis] != n:
            return f"IA3 vector of {n} values does not fit axis {axis} of the weight {tuple(weight_shape)}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        return fn.ia3_delta(weight, self.f32("weight"), bool(self.t["on_input"])).mul_(strength)  # type: ignore[arg-type]
