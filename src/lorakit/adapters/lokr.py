"""LoKr: ΔW = s·kron(W1, W2); each factor whole or decomposed (``_a``/``_b``), W2 optionally Tucker.
s = α/r only when a factor is decomposed, else 1."""
from __future__ import annotations

import torch

from . import functional as fn
from .base import Adapter, Tensor, numel_error


class LoKr(Adapter):
    kind = "lokr"
    detect = ("lokr_w1", "lokr_w1_a")
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "scale")

    def validate(self) -> None:
        if "lokr_w1" not in self.t:
            self.need("lokr_w1_a", "lokr_w1_b")
        if "lokr_w2" not in self.t:
            self.need("lokr_w2_a", "lokr_w2_b")

    @property
    def rank(self) -> int | None:
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in self.t:
                return int(self.t[k].shape[0])
        return None

    def scale(self) -> float:
        if "scale" in self.t:
            return float(self.t["scale"])
        return 1.0 if self.rank is None else super().scale()

    def _factors(self) -> tuple[Tensor, Tensor]:
        g = self.f32
        w1 = g("lokr_w1")
        if w1 is None:
            w1 = g("lokr_w1_a") @ g("lokr_w1_b")  # type: ignore[operator]
        return w1, fn.lokr_factor2(g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), g("lokr_t2"))

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        w1, w2 = self._factors()
        return numel_error("LoKr", w1.numel() * w2.numel(), weight_shape)

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        w1, w2 = self._factors()
        return fn.lokr_delta(w1, w2, self.scale() * strength, weight.shape)
