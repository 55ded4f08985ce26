"""LoRA and LoCon (optionally Tucker ``lora_mid``): ΔW = s·up@down.

Shapes: up (out, r) or (out, r, 1, 1); down (r, in) or (r, in, kh, kw); Tucker: mid (r, r, kh, kw) with down
(r, in[, 1, 1]). r ≥ 1 (a rank-0 layer changes nothing and is refused as broken).
"""
from __future__ import annotations

import torch

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from . import functional as fn
from .base import Adapter, Pieces, Shape, Tensor, gather_rows, same_kernel, trailing_ones, weight_kind_error

UP, DOWN, MID, BIAS = "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_up.bias"


class LoRA(Adapter):
    kind = "lora"
    detect = TYPE_DETECT["lora"]
    keys = TYPE_LEAVES["lora"]
    bypass = True
    changes_bias = True  # only with ``lora_up.bias`` (PEFT's ``lora_B.bias``, BFL control LoRAs): s·m·b

    def validate(self) -> None:
        self.need(UP, DOWN)
        up = self.dims(UP, 2, 4, what="(out, r) or (out, r, 1, 1)")
        down = self.dims(DOWN, 2, 4, what="(r, in) or (r, in, kh, kw)")
        if not trailing_ones(up):
            raise self.fail(f"{UP} must be (out, r) or (out, r, 1, 1), got shape {tuple(up.shape)}")
        mid = self.t.get(MID)
        if mid is not None:
            self.dims(MID, 4, what="(r, r, kh, kw)")
            if not trailing_ones(down):
                raise self.fail(f"with {MID}, {DOWN} must be (r, in, 1, 1), got shape {tuple(down.shape)}")
        ranks = (mid.shape[0], mid.shape[1]) if mid is not None else (down.shape[0], down.shape[0])
        if up.shape[1] != ranks[0] or down.shape[0] != ranks[1]:
            mids = f", lora_mid {tuple(mid.shape)}" if mid is not None else ""
            raise self.fail(f"lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)}{mids} ranks differ")
        bias = self.t.get(BIAS)
        if bias is not None and bias.numel() != up.shape[0]:
            raise self.fail(f"{BIAS} has {bias.numel()} values, lora_up {tuple(up.shape)} makes {up.shape[0]} outputs")

    @property
    def kind_name(self) -> str:
        if MID in self.t:
            return "locon-tucker"
        d = self.t[DOWN]
        return "locon" if d.dim() == 4 and d.shape[2] * d.shape[3] > 1 else "lora"

    @property
    def rank(self) -> int:
        return int(self.t[DOWN].shape[0])

    def widths(self) -> tuple[int | None, int | None]:
        out, inp, *_ = self.implied_shape()
        return out, inp

    def rows(self, pieces: Pieces, where: str) -> "LoRA":
        """The same ``down`` (so the same rank and α/r) with the rows ``pieces`` of ``up`` (and of a bias):
        s·up[rows]@down is exactly rows ``rows`` of s·up@down."""
        t = {**self.t, UP: gather_rows(self.t[UP], pieces)}
        if BIAS in self.t:
            t[BIAS] = gather_rows(self.t[BIAS].flatten(), pieces)
        return LoRA(t, where)

    def implied_shape(self) -> tuple[int, ...]:
        """The weight shape the factors fix: (out, in, kernel…)."""
        up, down = self.t[UP], self.t[DOWN]
        kernel = self.t[MID].shape[2:] if MID in self.t else down.shape[2:]
        return (up.shape[0], down.shape[1], *kernel)

    def shape_error(self, weight_shape: Shape) -> str | None:
        err = weight_kind_error("LoRA", weight_shape)
        if err:
            return err
        out, got_in, *kernel = self.implied_shape()
        want_kernel = tuple(weight_shape[2:])
        bias = self.t.get(BIAS)
        if bias is not None and bias.numel() != weight_shape[0]:
            return f"{BIAS} has {bias.numel()} values, the layer has {weight_shape[0]} outputs"
        # a Tucker core runs as the layer's own convolution in hooks mode: its kernel must be the layer's
        kernel_ok = tuple(kernel) == want_kernel or MID not in self.t and same_kernel(kernel, want_kernel)
        if out != weight_shape[0] or got_in != weight_shape[1] or not kernel_ok:
            return (f"LoRA maps {got_in}→{out} channels (kernel {tuple(kernel) or 1}), the layer's weight is "
                    f"{tuple(weight_shape)}")
        return None

    def _factors(self, dyn: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        up, down, mid = self.get(UP), self.get(DOWN), self.f32(MID)
        if dyn is not None and 0 < dyn < self.rank and mid is None:  # DyLoRA: the first `dyn` ranks, same α/r
            up, down = up[:, :dyn], down[:dyn]
        return up, down, mid

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        up, down, mid = self._factors(dyn)
        return fn.lora_delta(up, down, mid, self.scale() * strength, weight.shape)

    def bias_delta(self, strength: float) -> Tensor | None:
        b = self.f32(BIAS)
        return None if b is None else b.flatten() * (self.scale() * strength)

    def add_into(self, acc: Tensor, weight: Tensor, strength: float, dyn: int | None = None) -> None:
        up, down, mid = self._factors(dyn)
        if mid is not None:
            acc.add_(fn.lora_delta(up, down, mid, self.scale() * strength, weight.shape))
        else:
            fn.lora_add(acc, up, down, self.scale() * strength)

    def low_rank(self, dyn: int | None = None) -> tuple[Tensor, Tensor, float] | None:
        if MID in self.t:
            return None
        up, down, _ = self._factors(dyn)
        return fn.flat2(up), fn.flat2(down), self.scale()

    def write_sum(self, out: Tensor, weight: Tensor, strength: float, dyn: int | None = None) -> bool:
        if MID in self.t or weight.dtype != torch.float32 or out.dtype != torch.float32:
            return False
        up, down, _ = self._factors(dyn)
        fn.lora_write(out, weight, up, down, self.scale() * strength)
        return True

    def hook_output(self, module: torch.nn.Module, x: Tensor, weight: Tensor, strength: float,
                    dyn: int | None = None) -> Tensor:
        up, down, mid = self._factors(dyn)
        dt = x.dtype
        out = fn.lora_bypass(module, x, up.to(dt), down.to(dt), None if mid is None else mid.to(dt),
                             self.scale() * strength)
        b = self.bias_delta(strength) if getattr(module, "bias", None) is not None else None
        return out if b is None else out + fn.bias_view(module, b.to(dt), out)
