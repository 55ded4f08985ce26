"""GLoRA: ΔW = s·(W·A1·A2 + B1·B2). Two layouts exist — new: b1 (out, r), b2 (r, in·k·k); old: b1 (r, in·k·k),
b2 (out, r) — told apart by which order of b1, b2 chains; only when both do (out = in·k·k = r) does the shape of
``a1`` decide (new (in, r), old (r, in))."""
from __future__ import annotations

import torch

from . import functional as fn
from .base import Adapter, Tensor


class GLoRA(Adapter):
    needs_weight = True
    kind = "glora"
    detect = ("a1.weight",)
    keys = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha", "scale")

    def validate(self) -> None:
        self.need("a1.weight", "a2.weight", "b1.weight", "b2.weight")

    @property
    def old_layout(self) -> bool:
        b1, b2 = fn.flat2(self.t["b1.weight"]), fn.flat2(self.t["b2.weight"])
        new_chain, old_chain = b1.shape[1] == b2.shape[0], b2.shape[1] == b1.shape[0]
        if new_chain != old_chain:
            return old_chain
        a1 = fn.flat2(self.t["a1.weight"])
        return a1.shape[0] < a1.shape[1]

    @property
    def rank(self) -> int:
        a1 = fn.flat2(self.t["a1.weight"])
        return int(min(a1.shape))

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        b_out = self.t["b2.weight" if self.old_layout else "b1.weight"].shape[0]
        a_in = max(fn.flat2(self.t["a1.weight"]).shape)
        if b_out != weight_shape[0] or a_in != weight_shape[1]:
            return f"GLoRA maps {a_in}→{b_out} channels, the weight is {tuple(weight_shape)}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        g = self.f32
        f = fn.glora_old_delta if self.old_layout else fn.glora_delta
        return f(weight, g("a1.weight"), g("a2.weight"), g("b1.weight"), g("b2.weight"),  # type: ignore[arg-type]
                 self.scale() * strength)
