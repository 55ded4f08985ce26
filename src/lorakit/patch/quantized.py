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
        """round_c(fp32(dq(Wq)) + ΔW₁ + ΔW₂ + …), each ΔWᵢ added as lorakit's fused path adds it to a dense fp32
        weight (``adapter.add_into``: a LoRA/LoCon as one in-place ``addmm`` — no full-size ΔW temporary, no separate
        scale and add passes; other types ``acc += ΔWᵢ`` with ΔWᵢ read from fp32(dq(Wq))). One layer-sized fp32
        buffer: dq's own output when it is a fresh tensor, a copy when a type reads W or dq returned stored values."""
        c = compute_dtype(self.module)
        w32 = dq(self.module).float()
        reads_weight = any(contrib.adapter.needs_weight for contrib in self.contribs)
        acc = w32.clone() if reads_weight or _stored(w32, self.module) else w32
        for contrib in self.contribs:
            contrib.adapter.add_into(acc, w32, contrib.strength, contrib.dyn)
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


def _stored(t: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether ``t`` shares memory with one of the layer's stored tensors (an unquantized GGUF F32 weight's dq may be
    the parameter itself): such a tensor is never written."""
    ptr = t.untyped_storage().data_ptr()
    return any(ptr == s.untyped_storage().data_ptr() for s in (*module.parameters(recurse=False),
                                                                 *module.buffers(recurse=False)))


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


class Requantized:
    """The explicit opt-in (``mode="requant"``): a quantized layer's weight replaced by ``q(round_c(fp32(dq(Wq)) +
    ΣΔW))`` in its own type — no per-forward cost, but lossy (below 8 bits most of a LoRA is erased), so each layer's
    loss is measured and reported: ``kept`` = ⟨ΔW_eff, ΔW⟩/‖ΔW‖² and ``error`` = ‖ΔW_eff − ΔW‖/‖ΔW‖, with
    ΔW_eff = dq(new) − dq(old) the change the model really gets. The original parameter object is kept and put back
    on restore (exact)."""

    def __init__(self) -> None:
        self.originals: dict[str, tuple[torch.nn.Module, torch.nn.Parameter]] = {}
        self.report: dict[str, tuple[float, float]] = {}  # path → (kept, error)

    def apply(self, modules: dict[str, torch.nn.Module], layers: dict[str, Weighted]) -> None:
        """Every layer's new weight is made from the original weights — a type that reads a fused layer's whole
        weight (per-input DoRA on ``linear1``) reads its siblings' originals, not their requantized values — and
        only then are they all put in place (the new quantized weights are held meanwhile: no dense copy)."""
        self.restore()
        made: dict[str, torch.nn.Parameter] = {}
        for path, contribs in layers.items():
            module = modules[path]
            original = getattr(module, "weight")
            before = dq(module).float()
            wanted = MergedForward(module, contribs).weight().float()
            made[path] = requantize(module, wanted)
            setattr(module, "weight", made[path])
            try:
                after = dq(module).float()
            finally:
                setattr(module, "weight", original)
            self._report(path, wanted - before, after - before)
        for path, weight in made.items():
            self.originals[path] = (modules[path], getattr(modules[path], "weight"))
            setattr(modules[path], "weight", weight)

    def _report(self, path: str, delta: torch.Tensor, effective: torch.Tensor) -> None:
        norm = float((delta * delta).sum())
        kept = float((effective * delta).sum()) / norm if norm else 1.0
        error = float((effective - delta).norm()) / norm ** 0.5 if norm else 0.0
        self.report[path] = (kept, error)

    def restore(self) -> None:
        for module, weight in self.originals.values():
            setattr(module, "weight", weight)
        self.originals.clear()
        self.report.clear()

    @property
    def active(self) -> bool:
        return bool(self.originals)


def requantize(module: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Parameter:
    """``weight`` (fp32, logical shape) stored as ``module``'s own type: GGUF blocks by gguf's quantizer (the types
    it can quantize), fp8 with the layer's scale (round to nearest), bitsandbytes 4-bit by its ``quantize_4bit``."""
    from ..errors import LorakitError
    from ..quant import nf4
    from ..quant.layers import Fp8Weight, is_gguf
    from ..quant.make import GGUF_QUANTIZABLE, gguf_param

    old = getattr(module, "weight")
    if isinstance(module, Fp8Weight):
        scale = getattr(module, "scale", None)
        w = weight if scale is None else weight / (scale.reshape(-1, *[1] * (weight.dim() - 1))
                                                   if scale.numel() > 1 else scale)
        return torch.nn.Parameter(w.to(device=old.device, dtype=old.dtype), requires_grad=False)
    if is_gguf(module):
        kind = str(getattr(old.quant_type, "name", old.quant_type))
        if kind not in GGUF_QUANTIZABLE:
            raise LorakitError(f"requantizing needs a quantizer for {kind}, which the gguf package does not have "
                               f"({', '.join(GGUF_QUANTIZABLE)} only); use the exact merge (mode fused)")
        # laid out as the stored blocks are (an SD/SDXL GGUF layer's rows are not its weight's: ``GGUFShaped``)
        made = gguf_param(weight.cpu().reshape(tuple(old.quant_shape)), kind).to(old.device)
        return made  # type: ignore[return-value]  # a GGUFParameter
    if nf4.is_bnb4(module):
        return nf4.requantized(module, weight)
    raise LorakitError(f"{type(module).__name__} is not a quantized layer")
