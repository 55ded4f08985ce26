"""A model built on ``meta`` filled with quantized tensors: every Linear whose weight is GGUF blocks along its rows
becomes a diffusers ``GGUFLinear`` (blocks that cross its rows: a ``GGUFShapedLinear``), every GGUF convolution a
``GGUFConv2d``, every fp8 layer an ``Fp8Linear`` / ``Fp8Conv2d`` (with its scale); the rest is dense in the compute
dtype. Shapes are checked as logical shapes (a GGUF weight's rows × values, or the shape ComfyUI-GGUF recorded
before reshaping it — not its bytes) before anything is assigned."""
from __future__ import annotations

from pathlib import Path
from typing import cast

import torch

from ..errors import ModelError
from .files import ORIG_SHAPE
from .layers import FP8, Fp8Conv2d, Fp8Linear, Fp8Weight, GGUFConv2d, GGUFShapedLinear


def fill_quantized(model: torch.nn.Module, state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
                   path: Path, what: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """``model`` (built on ``meta``) with its Linears swapped for quantized ones where ``state`` has quantized
    weights, and every parameter taken from ``state`` (``ModelError`` for a missing, extra or mis-shaped one)."""
    _swap_layers(model, state, scales, compute_dtype)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what_is = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model has not"
        raise ModelError(f"{path}: the {what} {what_is} ({len(missing)} missing, {len(extra)} unknown tensors)")
    for name, value in state.items():
        _check_shape(model, name, value, path, what)
    for name, value in state.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        param = value if isinstance(value, torch.nn.Parameter) and _kept(value) else \
            torch.nn.Parameter(value if _kept(value) else value.to(compute_dtype), requires_grad=False)
        module._parameters[leaf] = param
    return model.requires_grad_(False).eval()


def _kept(t: torch.Tensor) -> bool:
    """Tensors stored as they are: GGUF blocks and fp8 weights."""
    return hasattr(t, "quant_type") or t.dtype in FP8


def _swap_layers(model: torch.nn.Module, state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
                 compute_dtype: torch.dtype) -> None:
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if type(module) not in (torch.nn.Linear, torch.nn.Conv2d) or weight is None or not _kept(weight):
            continue
        owner, _, child = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        made = _quantized_layer(module, weight, compute_dtype)
        if isinstance(made, Fp8Weight) and name in scales:
            setattr(made, "scale", scales[name])
        setattr(parent, child, made)


def _quantized_layer(module: torch.nn.Module, weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.nn.Module:
    """The quantized layer (on ``meta``) that takes ``weight`` in ``module``'s place."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    gguf = hasattr(weight, "quant_type")
    if isinstance(module, torch.nn.Conv2d):
        return GGUFConv2d(module, compute_dtype) if gguf else Fp8Conv2d(module, compute_dtype)
    linear = cast(torch.nn.Linear, module)
    args = (linear.in_features, linear.out_features, linear.bias is not None)
    if not gguf:
        return Fp8Linear(*args, compute_dtype, device="meta")
    if tuple(getattr(weight, "quant_shape")) != (linear.out_features, linear.in_features):  # blocks cross rows
        return GGUFShapedLinear(*args, compute_dtype)
    with torch.device("meta"):
        return GGUFLinear(*args, compute_dtype=compute_dtype)


def _check_shape(model: torch.nn.Module, name: str, value: torch.Tensor, path: Path, what: str) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    want = tuple(getattr(module, leaf).shape)
    got = _logical(value)
    if got != want:
        raise ModelError(f"{path}: the {what} tensor {name} is {tuple(got)}, expected {want}")


def _logical(value: torch.Tensor) -> tuple[int, ...]:
    shape = getattr(value, ORIG_SHAPE, None) or getattr(value, "quant_shape", None)
    return tuple(int(s) for s in shape) if shape is not None else tuple(value.shape)
