"""Quantized layers made from dense ones (GGUF blocks with the ``gguf`` package's own quantizer, fp8 casts with an
optional scale, bitsandbytes 4-bit by its own ``quantize_4bit``): for the tests, and for writing quantized files. K-quants have no quantizer in ``gguf`` (it only
dequantizes them); ``random_kquant`` makes valid random blocks (finite scales) of a given shape for tests."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .layers import Fp8Linear

Maker = Callable[[str, torch.nn.Linear], "torch.nn.Module | None"]
GGUF_QUANTIZABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16")
# Byte offsets of the fp16 scale fields in a block (gguf-py quants.py): set small so values stay finite.
KQUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,),
                 "Q4_0": (0,)}


def gguf_param(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """``weight`` (out, in) fp32 → a diffusers ``GGUFParameter`` of ``qtype`` blocks (rows of bytes)."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    kind = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(weight.detach().float().cpu().numpy(), kind)
    return GGUFParameter(torch.from_numpy(np.ascontiguousarray(blocks)), quant_type=kind)


def random_kquant(out: int, inp: int, qtype: str, seed: int = 0) -> torch.Tensor:
    """Valid random ``qtype`` blocks (K-quants, and Q8_0/Q4_0 when quantizing would be too slow: full-size
    benchmarks) for an (out, in) weight, ``in`` a multiple of the block size."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    if inp % block:
        raise ValueError(f"{qtype} rows hold whole blocks of {block} values; {inp} is not a multiple")
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(out, inp // block, size), dtype=np.uint8)
    scale = rng.uniform(1e-3, 2e-3, size=(out, inp // block)).astype(np.float16).view(np.uint8).reshape(out, -1, 2)
    for at in KQUANT_SCALES[qtype]:
        raw[:, :, at:at + 2] = scale
    return GGUFParameter(torch.from_numpy(raw.reshape(out, -1)), quant_type=kind)


def gguf_linear(linear: torch.nn.Linear, weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers ``GGUFLinear`` with ``weight`` (a GGUFParameter) and ``linear``'s bias."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    layer = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype)
    layer.weight = weight  # type: ignore[assignment]
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.requires_grad_(False)


def fp8_linear(linear: torch.nn.Linear, dtype: torch.dtype, compute_dtype: torch.dtype,
               scale: torch.Tensor | None = None) -> Fp8Linear:
    """An ``Fp8Linear`` storing ``linear``'s weight in ``dtype`` (divided by ``scale`` first, kept beside it)."""
    layer = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype)
    w = linear.weight.detach().float()
    if scale is not None:
        w = w / scale.float().reshape(-1, *[1] * (w.dim() - 1)) if scale.numel() > 1 else w / scale.float()
        layer.scale = scale.float()
    layer.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer


def bnb4_linear(linear: torch.nn.Linear, compute_dtype: torch.dtype, quant_type: str = "nf4", nested: bool = True,
                blocksize: int = 64) -> torch.nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight (taken in ``compute_dtype``, as diffusers quantizes
    a model loaded in that dtype) quantized by ``quantize_4bit``; on ``linear``'s device."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=nested, quant_type=quant_type)
    w = linear.weight.detach().to(compute_dtype)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                                     quant_type=quant_type, module=layer)._quantize(w.device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.requires_grad_(False)


def quantize_linears(model: torch.nn.Module, make: Maker) -> torch.nn.Module:
    """Every ``nn.Linear`` of ``model`` replaced by ``make(name, linear)`` (``None`` keeps it)."""
    for name, module in list(model.named_modules()):
        for child, sub in list(module.named_children()):
            if type(sub) is torch.nn.Linear:
                made = make(f"{name}.{child}" if name else child, sub)
                if made is not None:
                    setattr(module, child, made)
    return model

