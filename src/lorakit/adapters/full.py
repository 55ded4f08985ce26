"""Full difference (``diff``, ``diff_b``) and norm layers (``w_norm``, ``b_norm``): ΔW = m·diff, Δb = m·diff_b.

``diff`` has W's shape (a Linear's (out, in) and a 1×1 conv's (out, in, 1, 1) count as the same); ``diff_b`` has
the bias's: (out,) for Full, W's own shape for norm layers (their bias is shaped like their weight).
"""
from __future__ import annotations

import torch

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from .base import Adapter, Pieces, Shape, Tensor, gather_rows, numel, same_kernel


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

    def widths(self) -> tuple[int | None, int | None]:
        shape = self.t[self.weight_key].shape
        return (int(shape[0]) if shape else None), (int(shape[1]) if len(shape) >= 2 else None)

    def rows(self, pieces: Pieces, where: str) -> Adapter | None:
        if self.t[self.weight_key].dim() < 2:
            return None
        t = {self.weight_key: gather_rows(self.t[self.weight_key], pieces)}
        if self.bias_key in self.t:
            t[self.bias_key] = gather_rows(self.t[self.bias_key].flatten(), pieces)
        return type(self)(t, where)

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


class SetWeight(Adapter):
    """A new value for the weight (ComfyUI's ``set_weight``; the q/k norm scales of BFL control LoRAs): replaced,
    not added — ΔW = new − W at any non-zero strength (a weight of 0 leaves the LoRA off, as every LoRA), as
    diffusers and ComfyUI replace it whatever the strength."""

    kind = "set"
    detect = TYPE_DETECT["set"]
    keys = TYPE_LEAVES["set"]
    needs_weight = True

    def shape_error(self, weight_shape: Shape) -> str | None:
        got = tuple(self.t["set_weight"].shape)
        if numel(got) != numel(weight_shape) or (len(got) > 1 and got != tuple(weight_shape)):
            return f"set_weight is {got}, the weight is {tuple(weight_shape)}"
        return None

    def widths(self) -> tuple[int | None, int | None]:
        shape = self.t["set_weight"].shape
        return (int(shape[0]) if shape else None), None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        return self.get("set_weight").reshape(weight.shape) - weight

    def write_sum(self, out: Tensor, weight: Tensor, strength: float, dyn: int | None = None) -> bool:
        """The new value itself (not W + (new − W), which may round differently)."""
        if out.dtype != torch.float32:
            return False
        out.copy_(self.get("set_weight").reshape(out.shape))
        return True
