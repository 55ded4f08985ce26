"""LoRA and LoCon (optionally Tucker ``lora_mid``): ΔW = s·up@down."""
from __future__ import annotations

import torch

from . import functional as fn
from .base import Adapter, Tensor


class LoRA(Adapter):
    kind = "lora"
    detect = ("lora_down.weight", "lora_up.weight")
    keys = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale")

    def validate(self) -> None:
        self.need("lora_up.weight", "lora_down.weight")
        up, down = self.t["lora_up.weight"], self.t["lora_down.weight"]
        mid = self.t.get("lora_mid.weight")
        inner = up.shape[1] if up.dim() > 1 else -1
        r_mid = (mid.shape[0], mid.shape[1]) if mid is not None else (down.shape[0], down.shape[0])
        if inner != r_mid[0] or down.shape[0] != r_mid[1]:
            raise self.fail(f"lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} ranks differ")

    @property
    def kind_name(self) -> str:
        if "lora_mid.weight" in self.t:
            return "locon-tucker"
        d = self.t["lora_down.weight"]
        return "locon" if d.dim() == 4 and d.shape[2] * d.shape[3] > 1 else "lora"

    @property
    def rank(self) -> int:
        return int(self.t["lora_down.weight"].shape[0])

    def _factors(self, dyn: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        up, down, mid = self.f32("lora_up.weight"), self.f32("lora_down.weight"), self.f32("lora_mid.weight")
        assert up is not None and down is not None
        if dyn is not None and 0 < dyn < self.rank and mid is None:  # DyLoRA: the first `dyn` ranks, same α/r
            up, down = up[:, :dyn], down[:dyn]
        return up, down, mid

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        up, down = self.t["lora_up.weight"], self.t["lora_down.weight"]
        kernel = self.t["lora_mid.weight"].shape[2:] if "lora_mid.weight" in self.t else down.shape[2:]
        got_in = (down.shape[1] if down.dim() > 1 else 1)
        k = 1
        for s in kernel:
            k *= s
        want_k = 1
        for s in weight_shape[2:]:
            want_k *= s
        if up.shape[0] != weight_shape[0] or got_in != weight_shape[1] or k != want_k:
            return (f"LoRA maps {got_in}→{up.shape[0]} channels (kernel {tuple(kernel) or 1}), the layer's weight is "
                    f"{tuple(weight_shape)}")
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        up, down, mid = self._factors(dyn)
        return fn.lora_delta(up, down, mid, self.scale() * strength, weight.shape)

    def add_into(self, acc: Tensor, weight: Tensor, strength: float, dyn: int | None = None) -> None:
        up, down, mid = self._factors(dyn)
        if mid is not None:
            acc.add_(fn.lora_delta(up, down, mid, self.scale() * strength, weight.shape))
            return
        acc.view(acc.shape[0], -1).addmm_(fn.flat2(up), fn.flat2(down), alpha=self.scale() * strength)

    def low_rank(self, dyn: int | None = None) -> tuple[Tensor, Tensor, float] | None:
        if "lora_mid.weight" in self.t:
            return None
        up, down, _ = self._factors(dyn)
        return fn.flat2(up), fn.flat2(down), self.scale()

    def write_sum(self, out: Tensor, weight: Tensor, strength: float, dyn: int | None = None) -> bool:
        if "lora_mid.weight" in self.t or weight.dtype != torch.float32 or out.dtype != torch.float32:
            return False
        up, down, _ = self._factors(dyn)
        torch.addmm(weight.view(weight.shape[0], -1), fn.flat2(up), fn.flat2(down), alpha=self.scale() * strength,
                    out=out.view(out.shape[0], -1))
        return True

    def hook_output(self, module: torch.nn.Module, x: Tensor, weight: Tensor, strength: float,
                    dyn: int | None = None) -> Tensor:
        up, down, mid = self._factors(dyn)
        dt = x.dtype
        return fn.lora_bypass(module, x, up.to(dt), down.to(dt), None if mid is None else mid.to(dt),
                              self.scale() * strength)
