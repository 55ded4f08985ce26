"""SD/SDXL GGUF UNet files written as ComfyUI-GGUF writes them (``tools/convert.py`` + llama.cpp's quantizer): LDM
names, ``general.architecture``, every tensor of ≥ 512 values whose last axis is not a multiple of 256 reshaped to
rows of 256 with ``comfy.gguf.orig_shape.<name>``, then quantized where the row length divides the type's block
(else F16, as city96 falls back); 1-D tensors F32. Unlike city96 no tensor is kept dense for being small (the tiny
model's tensors all are). K-quants have no quantizer in ``gguf``: their blocks are valid random ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PREFIX = "model.diffusion_model."


def unet_ldm_state(pipe: object) -> dict[str, torch.Tensor]:
    """The pipeline's UNet in LDM names without prefix (an A1111 checkpoint's ``model.diffusion_model.*``)."""
    from lorakit.tools.checkpoint import to_checkpoint

    arch = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd1"
    return {k[len(PREFIX):]: v for k, v in to_checkpoint(pipe, arch).items() if k.startswith(PREFIX)}


def reshaped(arr: np.ndarray) -> np.ndarray | None:
    """city96's rule: the (n/256, 256) view of a tensor that needs it, else ``None``."""
    n = arr.size
    if arr.ndim > 1 and n >= 512 and n % 256 == 0 and arr.shape[-1] % 256:
        return arr.reshape(n // 256, 256)
    return None


def write_unet_gguf(path: Path, tensors: dict[str, torch.Tensor], qtype: str, arch: str | None = "sdxl",
                    prefix: str = "", shapes: dict[str, list[int]] | None = None) -> dict[str, str]:
    """Write ``tensors`` (LDM names); ``shapes`` overrides the recorded orig_shape of a tensor (bad files).
    Returns each tensor's stored type."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(path=None, arch=arch or "")
    if arch is None:  # stable-diffusion.cpp writes no architecture
        writer.kv_data[0].pop("general.architecture", None)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types: dict[str, str] = {}
    for name, t in tensors.items():
        arr = t.detach().float().numpy()
        flat = reshaped(arr)
        if flat is not None:
            writer.add_array(f"comfy.gguf.orig_shape.{prefix}{name}", (shapes or {}).get(name, list(arr.shape)))
            arr = flat
        if arr.ndim > 1 and arr.shape[-1] % block == 0:
            data = _kquant(arr.shape, qtype) if qtype.endswith("_K") else gguf.quants.quantize(arr, kind)
            writer.add_tensor(prefix + name, data, raw_dtype=kind)
            types[name] = qtype
        else:
            writer.add_tensor(prefix + name, arr if arr.ndim == 1 else arr.astype(np.float16))
            types[name] = "F32" if arr.ndim == 1 else "F16"
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _kquant(shape: tuple[int, ...], qtype: str) -> np.ndarray:
    from lorakit.quant.make import random_kquant

    rows = int(np.prod(shape[:-1]))
    return random_kquant(rows, int(shape[-1]), qtype, seed=rows).as_tensor().numpy()  # type: ignore[attr-defined]
