"""What ``lorakit inspect`` says of a base-model file (not a LoRA): its family, its layout, and its quantization —
the count of tensors per type (``Q8_0``, ``F32``, ``float8_e4m3fn`` …) and whether fp8 scales are present — read
from the file's header (safetensors) or tensor table (GGUF) without building the model. Schema
``lorakit.inspect-model/1``."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

SCHEMA = "lorakit.inspect-model/1"
MODEL_HEADS = ("double_blocks.", "single_blocks.", "model.diffusion_model.", "transformer_blocks.",
               "single_transformer_blocks.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def is_model_file(path: Path) -> bool:
    """A GGUF file, or a safetensors file whose tensors are a base model's (not a LoRA's leaves)."""
    if path.suffix.lower() == ".gguf":
        return True
    if path.suffix.lower() != ".safetensors":
        return False
    from .errors import LorakitError
    from .files.header import read_header

    try:
        keys = list(read_header(path).tensors)
    except LorakitError:
        return False
    weights = [k for k in keys if k.endswith((".weight", ".bias", ".scale"))]
    return len(weights) > len(keys) // 2 and any(k.startswith(MODEL_HEADS) for k in keys)


def describe_model(path: Path) -> dict[str, Any]:
    """``{schema, file, family, layout, quantization: {type: count}, scaled, tensors}``."""
    from .keymap.detection import detect, foreign_name

    types, keys, scaled, arch = _types(path)
    stripped = [k.removeprefix("model.diffusion_model.").removeprefix("diffusion_model.") for k in keys]
    family = detect(stripped[:256], {})
    name = family if isinstance(family, str) else (foreign_name(stripped[:256], {}) or "Stable Diffusion")
    if arch is not None or path.suffix.lower() == ".gguf":
        name = _gguf_unet(keys, arch) or name
    layout = "BFL" if any(k.startswith(("double_blocks.", "single_blocks.")) for k in stripped) else "diffusers/LDM"
    return {"schema": SCHEMA, "file": str(path), "family": name, "gguf_architecture": arch, "layout": layout,
            "quantization": dict(sorted(types.items(), key=lambda kv: -kv[1])), "scaled_fp8": scaled,
            "tensors": len(keys)}


def _gguf_unet(keys: list[str], arch: str | None) -> str | None:
    """An SD/SDXL GGUF UNet's architecture by name (``models/sd_gguf.py``), ``None`` for other files."""
    from .keymap.arch import NAMES
    from .models import sd_gguf

    names = dict.fromkeys(keys)
    return NAMES[sd_gguf.file_arch(names, arch)] if sd_gguf.is_unet_file(names) else None


def _types(path: Path) -> tuple[Counter[str], list[str], bool, str | None]:
    if path.suffix.lower() == ".gguf":
        from .quant.files import read_gguf

        q = read_gguf(path)
        return Counter(q.types()), list(q.tensors), False, q.architecture
    from .files.header import read_header

    header = read_header(path)
    keys = list(header.tensors)
    scaled = any(k.endswith(("scale_weight", "weight_scale", "comfy_quant")) or k.endswith("scaled_fp8") for k in keys)
    names = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    return Counter(names.get(t.dtype, t.dtype) for t in header.tensors.values()), keys, scaled, None


def as_text(info: dict[str, Any]) -> str:
    quant = ", ".join(f"{k} ×{v}" for k, v in info["quantization"].items())
    lines = [f"{info['file']}", f"  model file    {info['family']} ({info['layout']} names, {info['tensors']} tensors)",
             f"  quantization  {quant}" + (" — fp8 with scales (ComfyUI scaled fp8)" if info["scaled_fp8"] else "")]
    if info.get("gguf_architecture"):
        lines.append(f"  GGUF arch     {info['gguf_architecture']}")
    lines.append("  (a base model: load it with --model; the single files of FLUX.1, SD3, Chroma and Qwen-Image, and "
                 "SD/SDXL GGUF UNets, also need --components DIR)")
    return "\n".join(lines)
