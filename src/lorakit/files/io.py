"""Reading LoRA files safely.

``.safetensors``: the header is parsed and validated by us (size, JSON schema, offsets) before any tensor is read,
so a truncated or hostile file becomes an ``UnreadableFile`` naming the problem. ``.pt/.bin/.ckpt``: only
``torch.load(weights_only=True)``; anything needing more is refused as ``UnsafePickle``; no code in a file runs.
Pickled tensors are detached (a file of ``nn.Parameter``s must not carry ``requires_grad`` into the patched model)
and must be plain dense tensors with data: sparse, quantized, complex, ``meta`` tensors and views that repeat their
storage (stride 0, which would grow to their full size at the first ``.float()``) are refused by key.
"""
from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraFileError, UnreadableFile, UnsafePickle
from .header import Header, TensorInfo, file_size, read_header, read_metadata

__all__ = ["Header", "StateDict", "TensorInfo", "load_file", "load_pickle", "load_pickle_tensors", "read_header",
           "read_metadata", "save_file"]

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def load_file(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Load all tensors and the metadata of a LoRA file (any supported container)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return load_pickle_tensors(p), {}
    header = read_header(p)  # validates before safetensors touches the data
    from safetensors.torch import load_file as st_load

    try:
        return st_load(str(p), device="cpu"), header.metadata
    except Exception as e:  # safetensors raises its own types; give ours instead
        raise UnreadableFile(p, f"safetensors could not read the tensors ({e})") from None


def load_pickle(path: str | Path) -> object:
    """The object in a ``.pt/.bin/.ckpt`` file, through ``torch.load(weights_only=True)`` only."""
    p = Path(path)
    if file_size(p) == 0:
        raise UnreadableFile(p, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # legacy raw pickles load fine; torch's protocol notice only confuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _pickle_error(p, e) from None


def load_pickle_tensors(path: str | Path) -> StateDict:
    """The tensors of a ``.pt/.bin/.ckpt`` file (see ``_collect_tensors``), each checked by ``plain_tensor``."""
    p = Path(path)
    tensors = _collect_tensors(p, load_pickle(p))
    if not tensors:
        raise UnreadableFile(p, "file holds no tensors")
    return tensors


def _pickle_error(p: Path, e: Exception) -> LoraFileError:
    """``UnsafePickle`` when the pickle asks for a class or function (refused, never run), else ``UnreadableFile``."""
    msg = str(e)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Trying to [^.\n]*", msg)
    if match:
        what = match.group(1) or match.group(0)
        return UnsafePickle(p, f"pickle needs more than plain tensors ({what}) and was refused; no code from it "
                               "was run. Convert it to .safetensors with a tool you trust.")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
    reason = detail.group(1).strip() if detail else f"{type(e).__name__}: {msg.strip()}".rstrip(": ")
    return UnreadableFile(p, f"not a readable torch file ({reason.splitlines()[0][:200] if reason else 'empty'})")


def _collect_tensors(p: Path, obj: object) -> StateDict:
    """Tensors of a loaded pickle: a flat dict, or one nested under ``state_dict``; non-tensors are ignored."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return {}
    return {str(k): plain_tensor(p, str(k), v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def plain_tensor(p: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, when it is a dense tensor with its own data; else ``UnreadableFile`` naming ``key``."""
    kind = ("a meta tensor (it has no data)" if t.is_meta else
            f"a {t.layout} tensor" if t.layout != torch.strided else
            "a quantized tensor" if t.is_quantized else
            f"a {t.dtype} tensor" if t.is_complex() else
            "a nested tensor" if t.is_nested else None)
    if kind is None and t.numel() * t.element_size() > t.untyped_storage().nbytes():
        kind = f"a {tuple(t.shape)} view of {t.untyped_storage().nbytes()} stored bytes (stride {t.stride()})"
    if kind is not None:
        raise UnreadableFile(p, f"unsupported tensor {key!r}: {kind}; lorakit reads dense real-valued tensors")
    return t.detach()


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def save_file(tensors: StateDict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file byte-for-byte reproducibly: keys sorted, header padded to 8 bytes (the
    ``safetensors`` package orders metadata differently from run to run)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                                 offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)
