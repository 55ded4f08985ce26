"""LoRAs on quantized layers (GGUF, fp8): the stored weight is never written. A patched layer's forward becomes

    F.linear(x, round_c(fp32(dq(Wq)) + Σ mᵢ·ΔWᵢ), round_c(fp32(b) + Σ mᵢ·Δbᵢ))     (F.conv2d for a convolution)

with ``dq`` the layer's own dequantization and ``c`` its compute dtype — ΔW recomputed per forward, one layer at a
time (no dense copy of the model is kept), rounded once; at strength 0 it is the unpatched layer bit for bit, and
restore (the forward put back) is exact by construction. Hooks mode on a quantized layer keeps LoRA/LoCon as the
side branch ``q(x) + m·s·up(down(x))`` and merges the other types this way (a cached dense ΔW per layer would be
the dequantized copy a quantized base exists to avoid).
"""
from __future__ import annotations

from typing import Any

import torch

from ..adapters import functional as fn
from ..quant.layers import compute_dtype, dq
from .plan import Contribution

Weighted = list[Contribution]


class MergedForward:
    """A quantized Linear's forward with its contributions merged into the dequantized weight."""

    def __init__(self, module: torch.nn.Module, contribs: Weighted) -> None:
        self.module = module
        self.contribs = contribs

    def weight(self) -> torch.Tensor:
        """round_c(fp32(dq(Wq)) + ΔW₁ + ΔW₂ + …) with ΔWᵢ = ``adapter.delta(fp32(dq(Wq)), mᵢ)``: the weight this
        forward uses, the very formula an independent recomputation writes (one layer-sized temporary)."""
        c = compute_dtype(self.module)
        w32 = dq(self.module).float()
        acc = w32
        for contrib in self.contribs:
            acc = acc + contrib.adapter.delta(w32, contrib.strength, contrib.dyn)
        return acc.to(c)

    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, "bias", None)
        if bias is None:
            return None
        c = compute_dtype(self.module)
        deltas = [d for contrib in self.contribs if contrib.adapter.changes_bias
                  and (d := contrib.adapter.bias_delta(contrib.strength)) is not None]
        if not deltas:
            return torch.Tensor.to(bias, c)
        b32 = bias.float()
        for d in deltas:
            b32 = b32 + d.to(b32.device).reshape(b32.shape)
        out: torch.Tensor = b32.to(c)
        return out

    def __call__(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return fn.module_op(self.module, inputs, self.weight(), self.bias())  # F.linear / F.conv2d as the layer


class QuantizedPatcher:
    """Merged forwards on the quantized layers a plan changes; ``restore`` gives every layer its own forward."""

    def __init__(self) -> None:
        self.merged: dict[str, MergedForward] = {}

    def apply(self, modules: dict[str, torch.nn.Module], layers: dict[str, Weighted]) -> int:
        for path in [p for p in self.merged if p not in layers]:
            self._remove(path)
        for path, contribs in layers.items():
            merged = self.merged.get(path)
            if merged is None:
                merged = self.merged[path] = MergedForward(modules[path], contribs)
                setattr(modules[path], "forward", merged)  # an instance attribute: ``del`` restores the class's
            merged.contribs = contribs
        return len(layers)

    def _remove(self, path: str) -> None:
        merged = self.merged.pop(path)
        if "forward" in vars(merged.module):
            del merged.module.forward

    def restore(self) -> None:
        for path in list(self.merged):
            self._remove(path)

    @property
    def active(self) -> bool:
        return bool(self.merged)
