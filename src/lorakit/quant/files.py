"""Quantized model files, read into tensors that keep their quantization: GGUF (city96 / stable-diffusion.cpp:
every type diffusers dequantizes, BF16 and F16/F32 too) as diffusers ``GGUFParameter``s of raw blocks — with
ComfyUI-GGUF's ``comfy.gguf.orig_shape.<name>`` (SD1/SDXL files store a tensor whose last axis is not a multiple of
256 as rows of 256 values) read back: F16/F32 tensors take that shape, quantized ones keep their blocks, laid out as
rows of the original first axis where the blocks divide them, and carry the shape as ``ORIG_SHAPE``; safetensors
whose weights are fp8 (e4m3fn / e5m2), unscaled or with ComfyUI's scales — legacy ``scaled_fp8`` marker +
``<layer>.scale_weight``, new ``<layer>.comfy_quant`` (JSON format name) + ``<layer>.weight_scale``. Every bad file
is a ``ModelError`` naming the file and the tensor; nothing is half-loaded (the model is built only after every
tensor passed)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError
from .layers import FP8

SCALE_KEYS = ("scale_weight", "weight_scale")  # legacy, new
IGNORED = ("scale_input", "input_scale", "comfy_quant", "scaled_fp8")  # for fp8 matmuls; lorakit dequantizes
ORIG_SHAPE = "gguf_orig_shape"  # attribute of a GGUFParameter: its tensor's shape before ComfyUI-GGUF reshaped it
ORIG_KEY = "comfy.gguf.orig_shape."
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


@dataclass
class Quantized:
    """A quantized file's tensors (quantized weights kept as they are), per-layer fp8 scales, what it is."""

    tensors: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # layer (module path) → fp8 scale
    kind: str = ""  # "gguf" | "fp8" | "fp8 scaled"
    architecture: str | None = None  # GGUF general.architecture

    def types(self) -> dict[str, int]:
        """Quantization type → tensor count (``inspect``)."""
        out: dict[str, int] = {}
        names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}  # GGUF's and safetensors' names
        for t in self.tensors.values():
            kind = getattr(t, "quant_type", None)
            name = str(getattr(kind, "name", kind)) if kind is not None else \
                names.get(t.dtype, str(t.dtype).removeprefix("torch."))
            out[name] = out.get(name, 0) + 1
        return out


def read_gguf(path: Path) -> Quantized:
    """Every tensor of a GGUF file: quantized ones as ``GGUFParameter`` (rows of blocks), F32/F16 as tensors."""
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    try:
        reader = gguf.GGUFReader(str(path))
        entries = list(reader.tensors)
    except (ValueError, IndexError, KeyError, OSError, struct_error()) as e:
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    shapes = _orig_shapes(reader, {e.name for e in entries}, path)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        kind = entry.tensor_type
        if kind not in plain and kind not in SUPPORTED_GGUF_QUANT_TYPES:
            raise ModelError(f"{path}: tensor {entry.name} is {getattr(kind, 'name', kind)}, which lorakit cannot "
                             f"dequantize (supported: F32, F16, {', '.join(t.name for t in SUPPORTED_GGUF_QUANT_TYPES)})")
        data = torch.from_numpy(np.array(entry.data))
        orig = shapes.get(entry.name)
        if kind in plain:
            out[entry.name] = data if orig is None else data.reshape(_checked(orig, data.numel(), entry.name, path))
        else:
            out[entry.name] = _blocks(GGUFParameter(data, quant_type=kind), orig, entry.name, path)
    return Quantized(out, kind="gguf", architecture=architecture(reader))


def gguf_names(path: Path) -> list[str]:
    """A GGUF file's tensor names (its tensor table; no data read). ``ModelError`` for an unreadable file."""
    import gguf

    try:
        return [t.name for t in gguf.GGUFReader(str(path)).tensors]
    except (ValueError, IndexError, KeyError, OSError, struct_error()) as e:
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None


def _orig_shapes(reader: Any, names: set[str], path: Path) -> dict[str, tuple[int, ...]]:
    """``comfy.gguf.orig_shape.<name>`` fields: an array of positive integers for a tensor of the file."""
    out: dict[str, tuple[int, ...]] = {}
    for key, field_ in reader.fields.items():
        if not key.startswith(ORIG_KEY):
            continue
        name = key[len(ORIG_KEY):]
        try:
            dims = tuple(int(field_.parts[i][0]) for i in field_.data)
        except (IndexError, TypeError, ValueError, OverflowError):
            dims = ()
        if name not in names or not 1 <= len(dims) <= 4 or min(dims) < 1 or \
                any(not np.issubdtype(field_.parts[i].dtype, np.integer) for i in field_.data):
            raise ModelError(f"{path}: {key} must be 1 to 4 positive integers for a tensor of the file, got "
                             f"{list(dims) or 'something else'}" + ("" if name in names else " (no such tensor)"))
        out[name] = dims
    return out


def _checked(orig: tuple[int, ...], numel: int, name: str, path: Path) -> tuple[int, ...]:
    if int(np.prod(orig)) != numel:
        raise ModelError(f"{path}: tensor {name} holds {numel} values; its {ORIG_KEY}{name} {list(orig)} needs "
                         f"{int(np.prod(orig))}")
    return orig


def _blocks(param: torch.Tensor, orig: tuple[int, ...] | None, name: str, path: Path) -> torch.Tensor:
    """A quantized tensor with its original shape: the bytes laid out as rows of ``orig[0]`` where whole blocks fit
    a row (a byte reshape: values run row-major, block after block), the shape kept as ``ORIG_SHAPE``."""
    from diffusers.quantizers.gguf.utils import GGUFParameter
    import gguf

    if orig is None:
        return param
    kind = getattr(param, "quant_type")
    _checked(orig, int(np.prod(getattr(param, "quant_shape"))), name, path)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    row = int(np.prod(orig[1:]))
    if row % block == 0:
        param = GGUFParameter(param.as_tensor().reshape(orig[0], row // block * size),  # type: ignore[attr-defined]
                              quant_type=kind)
    setattr(param, ORIG_SHAPE, orig)
    return param


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def architecture(reader: Any) -> str | None:
    """A GGUF reader's ``general.architecture`` (``None`` when absent or unreadable)."""
    field_ = reader.get_field("general.architecture")
    if field_ is None:
        return None
    try:
        return bytes(field_.parts[field_.data[0]]).decode("utf-8", "replace")
    except (IndexError, TypeError):
        return None


def fp8_file(sd: dict[str, torch.Tensor], path: Path) -> Quantized | None:
    """A safetensors state dict whose weights are fp8 → its tensors and per-layer scales; ``None`` when no weight
    is fp8 (a dense file)."""
    if not any(t.dtype in FP8 for k, t in sd.items() if k.endswith(".weight")):
        return None
    scales: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        layer, _, name = key.rpartition(".")
        if name in SCALE_KEYS:
            scales[layer] = _scale(t, key, path)
        elif name == "comfy_quant":
            _check_format(t, key, path)
        elif name not in IGNORED and key not in IGNORED:
            tensors[key] = t
    orphans = [layer for layer in scales if f"{layer}.weight" not in tensors]
    if orphans:
        raise ModelError(f"{path}: {orphans[0]}.scale_weight/weight_scale has no weight beside it")
    wrong = [layer for layer, s in scales.items() if s.numel() not in (1, tensors[f"{layer}.weight"].shape[0])]
    if wrong:
        raise ModelError(f"{path}: the scale of {wrong[0]} has {scales[wrong[0]].numel()} values; expected 1 (per "
                         f"tensor) or {tensors[f'{wrong[0]}.weight'].shape[0]} (per row)")
    return Quantized(tensors, scales, kind="fp8 scaled" if scales else "fp8")


def _scale(t: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    if not t.is_floating_point() or t.numel() == 0 or not bool(torch.isfinite(t.float()).all()) or \
            bool((t.float() == 0).any()):
        raise ModelError(f"{path}: {key} must hold finite, non-zero scales, got {t.dtype} {tuple(t.shape)}")
    return t.float().flatten()


def _check_format(t: torch.Tensor, key: str, path: Path) -> None:
    """ComfyUI's ``comfy_quant``: uint8 bytes of a JSON object naming the format; only fp8 ones are read."""
    try:
        spec = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode("utf-8"))
        fmt = spec.get("format") if isinstance(spec, dict) else None
    except (ValueError, UnicodeDecodeError):
        fmt = None
    if fmt not in FP8_FORMATS:
        raise ModelError(f"{path}: {key} names the quantization {fmt!r}; lorakit reads {', '.join(FP8_FORMATS)} "
                         "(nvfp4, mxfp8 and int8 layers are not supported)")
