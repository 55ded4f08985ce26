"""Quantized layers and the one way lorakit reads their weights: ``dq(module)``, the layer's own dequantization.

A quantized weight is never written and never read with ``.float()`` (on GGUF bytes that gives the bytes as
numbers): everything that needs W — fused sums, DoRA/OFT/GLoRA/IA3, hooks, the rows of a fused layer — reads
``weight_values(module)``, which is ``dq`` for a quantized layer and the weight itself otherwise.

Layers (subclasses of ``nn.Linear`` / ``nn.Conv2d``, so diffusers' models and lorakit's module lookup take them as
such):

- diffusers' ``GGUFLinear`` (weight a ``GGUFParameter`` of raw GGUF blocks): dq = ``dequantize_gguf_tensor(w)``
  cast to the layer's ``compute_dtype`` — exactly what its own forward computes;
- ``Fp8Linear`` / ``Fp8Conv2d`` (here): weight stored in ``float8_e4m3fn``/``float8_e5m2``, optional per-tensor (or per-row)
  ``scale`` (ComfyUI's ``scale_weight`` / ``weight_scale``); dq = ``w.to(c)`` unscaled, ``(fp32(w) · scale).to(c)``
  scaled — lorakit's rule for scaled fp8, fixed once (ComfyUI's own forward computes ``w.to(c) · scale.to(c)``,
  which rounds twice);
- ``GGUFConv2d`` / ``GGUFShapedLinear`` (here): GGUF blocks that do not run along the weight's rows — an SD/SDXL
  UNet's convolutions, and tensors ComfyUI-GGUF stored as rows of 256 values (``comfy.gguf.orig_shape``) whose
  blocks cross the layer's rows (K-quants on 320-wide Linears); dq = ``dequantize_gguf_tensor(w)`` reshaped to the
  layer's weight shape, cast to ``compute_dtype`` (the values ``GGUFLinear``'s dq gives, laid out in that shape);
- bitsandbytes' ``Linear4bit`` (NF4/FP4, weight a ``Params4bit``; ``quant/nf4.py``): dq = bitsandbytes'
  ``dequantize_4bit(data, quant_state)`` cast to the layer's compute dtype.
"""
from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F

from . import nf4

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_values(w: torch.Tensor, scale: torch.Tensor | None, c: torch.dtype) -> torch.Tensor:
    """lorakit's one rule for an fp8 weight's values in dtype ``c``: ``w.to(c)`` unscaled, ``(fp32(w) · scale).to(c)``
    with a per-tensor or per-row (output channel) scale. Layers (``Fp8Weight``) and the file tools share it."""
    if scale is None:
        return w.to(c)
    s = scale.float().to(w.device)
    s = s.reshape(-1, *[1] * (w.dim() - 1)) if s.numel() > 1 else s.reshape(())
    return (w.float() * s).to(c)


class QuantWeight(abc.ABC):
    """What lorakit's own quantized layers share: a stored weight that is never written, its dequantization to
    ``compute_dtype`` (``dequantized``), the bias in that dtype."""

    compute_dtype: torch.dtype

    @abc.abstractmethod
    def dequantized(self) -> torch.Tensor:
        """The weight's values in ``compute_dtype``, in the layer's weight shape."""

    def _bias(self) -> torch.Tensor | None:
        bias = getattr(self, "bias", None)
        return None if bias is None else bias.to(self.compute_dtype)


class Fp8Weight(QuantWeight):
    """An fp8 layer: its stored fp8 weight, an optional fp32 scale (per tensor or per output row), and the
    dequantization to ``compute_dtype``."""

    def dequantized(self) -> torch.Tensor:
        stored = getattr(self, "scale", None)
        return fp8_values(getattr(self, "weight"), stored if isinstance(stored, torch.Tensor) else None,
                          self.compute_dtype)


class GGUFShaped(QuantWeight):
    """A GGUF layer whose blocks (a diffusers ``GGUFParameter``, raw bytes) are read whole and laid out in
    ``logical_shape``: ``dequantize_gguf_tensor(w).reshape(logical_shape).to(compute_dtype)``."""

    logical_shape: tuple[int, ...]

    def dequantized(self) -> torch.Tensor:
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(getattr(self, "weight")).reshape(self.logical_shape).to(self.compute_dtype)


class Fp8Linear(Fp8Weight, torch.nn.Linear):
    """A Linear whose weight is stored in fp8 (never written); the forward dequantizes it to ``compute_dtype``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: Any = None) -> None:
        torch.nn.Linear.__init__(self, in_features, out_features, bias, device=device)
        self.compute_dtype = compute_dtype
        self.register_buffer("scale", None)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """As diffusers' ``GGUFLinear``: the inputs as they come (the model's compute dtype)."""
        return F.linear(inputs, self.dequantized(), self._bias())


def _meta_conv(layer: torch.nn.Conv2d, conv: torch.nn.Conv2d) -> None:
    """``layer`` initialised (on ``meta``: its weight comes from a file) with ``conv``'s geometry."""
    torch.nn.Conv2d.__init__(layer, conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                             conv.stride, conv.padding, conv.dilation, conv.groups,  # type: ignore[arg-type]
                             conv.bias is not None, conv.padding_mode, device="meta")


class Fp8Conv2d(Fp8Weight, torch.nn.Conv2d):
    """A Conv2d whose weight is stored in fp8 (SDXL fp8 checkpoints quantize the UNet's convolutions too)."""

    def __init__(self, conv: torch.nn.Conv2d, compute_dtype: torch.dtype) -> None:
        _meta_conv(self, conv)
        self.compute_dtype = compute_dtype
        self.register_buffer("scale", None)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(inputs, self.dequantized(), self._bias())


class GGUFConv2d(GGUFShaped, torch.nn.Conv2d):
    """A Conv2d whose weight is GGUF blocks (SD/SDXL GGUF UNets): ``F.conv2d(x, dq(W).reshape(out, in, kh, kw), b)``."""

    def __init__(self, conv: torch.nn.Conv2d, compute_dtype: torch.dtype) -> None:
        _meta_conv(self, conv)
        self.compute_dtype = compute_dtype
        self.logical_shape = tuple(int(s) for s in conv.weight.shape)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(inputs, self.dequantized(), self._bias())


class GGUFShapedLinear(GGUFShaped, torch.nn.Linear):
    """A Linear whose GGUF blocks cross its rows (stored as rows of 256 values, ``comfy.gguf.orig_shape``, in a
    type whose blocks do not divide the row): ``F.linear(x, dq(W).reshape(out, in), b)``. Where blocks divide the
    rows the loader lays the bytes out as rows and uses diffusers' ``GGUFLinear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype) -> None:
        torch.nn.Linear.__init__(self, in_features, out_features, bias, device="meta")
        self.compute_dtype = compute_dtype
        self.logical_shape = (out_features, in_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.dequantized(), self._bias())


def is_gguf(module: torch.nn.Module) -> bool:
    """A diffusers GGUF layer (its weight carries a ``quant_type``; a bitsandbytes ``Params4bit`` does too)."""
    return hasattr(getattr(module, "weight", None), "quant_type") and not nf4.is_bnb4(module)


def is_quantized(module: torch.nn.Module) -> bool:
    """A layer whose stored weight is not its values (GGUF blocks, fp8 storage): LoRAs never write it."""
    return isinstance(module, QuantWeight) or is_gguf(module) or nf4.is_bnb4(module)


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    if nf4.is_bnb4(module):
        return nf4.bnb_compute_dtype(module)
    dt = getattr(module, "compute_dtype", None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def dq(module: torch.nn.Module) -> torch.Tensor:
    """The weight the layer's forward uses, in its compute dtype (the loader's own dequantization)."""
    if isinstance(module, QuantWeight):
        return module.dequantized()
    if nf4.is_bnb4(module):
        return nf4.dequantized(module)
    return gguf_values(getattr(module, "weight"), compute_dtype(module))


def gguf_values(w: torch.Tensor, c: torch.dtype) -> torch.Tensor:
    """A GGUF weight's values in ``c`` (a ``GGUFParameter`` of raw blocks → (out, in)): diffusers'
    ``dequantize_gguf_tensor`` cast to ``c``, as ``GGUFLinear``'s own forward computes it. Layers and the file tools
    share it."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(w).to(c)


def weight_values(module: torch.nn.Module) -> torch.Tensor:
    """W as numbers: ``dq`` for a quantized layer, the weight itself otherwise (detached)."""
    if is_quantized(module):
        return dq(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight.detach()


def weight_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """The weight's logical shape ((out, in) for a GGUF layer, not its byte shape; a layer widened for a control
    LoRA: its own inputs, ``patch/expand.py``); ``None`` without a weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    shape = nf4.logical_shape(module) if nf4.is_bnb4(module) else module.logical_shape \
        if isinstance(module, GGUFShaped) else getattr(weight, "quant_shape", None)
    out = tuple(int(s) for s in shape) if shape is not None else tuple(weight.shape)
    narrow = getattr(module, "lorakit_inputs", None)  # widened for a control LoRA: the model's own width
    return (out[0], int(narrow), *out[2:]) if isinstance(narrow, int) else out


def quant_name(module: torch.nn.Module) -> str | None:
    """``Q8_0``, ``float8_e4m3fn (scaled)``, ``nf4 (nested)``… for a quantized layer; ``None`` otherwise."""
    if isinstance(module, Fp8Weight):
        name = str(module.weight.dtype).removeprefix("torch.")
        return f"{name} (scaled)" if getattr(module, "scale", None) is not None else name
    if nf4.is_bnb4(module):
        return nf4.name(module)
    if is_gguf(module):
        kind = getattr(module.weight, "quant_type", None)
        return str(getattr(kind, "name", kind))
    return None
