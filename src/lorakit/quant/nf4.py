"""bitsandbytes 4-bit layers (NF4 / FP4: ``bnb.nn.Linear4bit`` with a ``Params4bit`` weight), read and written
through bitsandbytes' own functions. bitsandbytes is optional (the ``quant`` extra): nothing here imports it until a
4-bit layer is met, and a 4-bit model without it is a ``ModelError``.

A ``Params4bit`` holds packed nibbles (``[N·K/2, 1]`` uint8) and a ``QuantState`` (absmax per block — itself
8-bit quantized when "nested" —, block size, quant type, the logical shape ``[N, K]`` and dtype). Its values are
``dequantize_4bit(data, quant_state)`` — the function bitsandbytes' own forward uses on its dequantize path (CUDA
for more than a few tokens, CPUs without AVX512-BF16). On a CPU with AVX512-BF16, bitsandbytes' forward in eval
mode rewrites the weight once into a CPU-only layout (nibbles reordered, absmax unnested and rounded to bf16); such a
weight is read by undoing the nibble order exactly and passing the bf16 absmax (the values that layout computes with)
to the same ``dequantize_4bit`` kernel.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError

EXTRA = 'pip install "lorakit[quant]" (bitsandbytes)'


def is_bnb4(module: torch.nn.Module) -> bool:
    """A layer whose weight is a quantized bitsandbytes ``Params4bit`` (it carries a ``quant_state``)."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def state(module: torch.nn.Module) -> Any:
    """The layer's ``QuantState``."""
    return getattr(module, "weight").quant_state


def logical_shape(module: torch.nn.Module) -> tuple[int, ...]:
    """(out, in): the weight's shape before packing."""
    return tuple(int(s) for s in state(module).shape)


def bnb_compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The layer's ``compute_dtype`` when set, else the dtype its weight was quantized from."""
    dt = getattr(module, "compute_dtype", None)
    return dt if isinstance(dt, torch.dtype) else state(module).dtype


def functional() -> Any:
    """``bitsandbytes.functional``, or a ``ModelError`` saying how to get it."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ModelError(f"this model has bitsandbytes 4-bit (NF4/FP4) layers and bitsandbytes is not usable "
                         f"({type(e).__name__}: {str(e)[:120]}); {EXTRA}") from None
    return bnbf


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """``dequantize_4bit(data, quant_state)`` (the layer's logical (out, in) shape) cast to its compute dtype."""
    bnbf = functional()
    weight = getattr(module, "weight")
    data, qs = weight.data, state(module)
    if getattr(qs, "packing_format_for_cpu", False):
        data, qs = _canonical(data, qs)
    return bnbf.dequantize_4bit(data, qs).to(bnb_compute_dtype(module))


def _canonical(packed: torch.Tensor, qs: Any, block_n: int = 32) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' CPU layout (``_convert_weight_packed_for_cpu``: [N, K/2], nibbles of 32 rows interleaved,
    absmax [K/blocksize, N] bf16) → the canonical packed bytes and a non-nested state with that absmax (fp32 of
    the bf16 values). The nibble order is undone exactly; nothing of the layer is changed."""
    n, k = (int(s) for s in qs.shape)
    p = packed.view(torch.uint8).reshape(-1, 32)
    nibbles = torch.cat([p & 0xF, p >> 4], dim=-1).reshape(n // block_n, k // 2, block_n, 2)
    flat = nibbles.transpose(-3, -2).reshape(-1)  # row-major [N, K] codes
    data = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
    plain = copy.copy(qs)
    plain.absmax = qs.absmax.T.reshape(-1).float()
    plain.nested, plain.state2, plain.offset = False, None, None
    plain.dtype = torch.bfloat16
    plain.packing_format_for_cpu = False
    return data, plain


def requantized(module: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Parameter:
    """``weight`` (logical shape) quantized as the layer's own weight was (quant type, block size, nested absmax,
    storage dtype, dtype) by ``quantize_4bit``, as a new ``Params4bit`` (the layer's own is left as it is)."""
    import bitsandbytes as bnb

    bnbf = functional()
    old, qs = getattr(module, "weight"), state(module)
    data, made = bnbf.quantize_4bit(weight.to(device=old.device, dtype=qs.dtype), blocksize=qs.blocksize,
                                    compress_statistics=bool(qs.nested), quant_type=qs.quant_type,
                                    quant_storage=old.dtype)
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=made, blocksize=qs.blocksize,
                             compress_statistics=bool(qs.nested), quant_type=qs.quant_type,
                             quant_storage=old.dtype, module=module,  # type: ignore[arg-type]  # a Linear4bit
                             bnb_quantized=True)


def name(module: torch.nn.Module) -> str:
    """``nf4``, ``fp4``, with ``(nested)`` when the absmax is 8-bit quantized itself."""
    qs = state(module)
    return f"{qs.quant_type} (nested)" if qs.nested else str(qs.quant_type)


def check_folder(path: Path) -> None:
    """A diffusers model folder whose component configs say bitsandbytes quantization (``quantization_config``
    with ``quant_method: bitsandbytes``) → a ``ModelError`` where it cannot load: bitsandbytes missing, or no CUDA
    (diffusers' bitsandbytes loader refuses to run without a GPU)."""
    import json

    for config in sorted(path.glob("*/config.json")):
        try:
            quant = json.loads(config.read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            continue  # unreadable configs are diffusers' to report
        if not isinstance(quant, dict) or quant.get("quant_method") != "bitsandbytes":
            continue
        what = f"{config.parent}: a bitsandbytes-quantized {'4' if quant.get('load_in_4bit') else '8'}-bit model"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError(f"{what}; bitsandbytes is not installed: {EXTRA}") from None
        if not torch.cuda.is_available():
            raise ModelError(f"{what}; diffusers loads bitsandbytes models on CUDA only (no GPU here)")
