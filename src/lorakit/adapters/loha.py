"""LoHa: ΔW = s·(w1a@w1b) ⊙ (w2a@w2b), optionally Tucker (``hada_t1``, ``hada_t2``)."""
from __future__ import annotations

import torch

from . import functional as fn
from .base import Adapter, Tensor, numel_error


class LoHa(Adapter):
    kind = "loha"
    detect = ("hada_w1_a",)
    keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "scale")

    def validate(self) -> None:
        self.need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    @property
    def rank(self) -> int:
        return int(self.t["hada_w1_b"].shape[0])

    def _size(self) -> int:
        if "hada_t1" in self.t:
            t, a, b = self.t["hada_t1"], self.t["hada_w1_a"], self.t["hada_w1_b"]
            return a.shape[1] * b.shape[1] * t[0, 0].numel()
        return self.t["hada_w1_a"].shape[0] * fn.flat2(self.t["hada_w1_b"]).shape[1]

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        return numel_error("LoHa", self._size(), weight_shape)

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        g = self.f32
        return fn.loha_delta(g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"), g("hada_w2_b"),  # type: ignore[arg-type]
                             g("hada_t1"), g("hada_t2"), self.scale() * strength, weight.shape)
