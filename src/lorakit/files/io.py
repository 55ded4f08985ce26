"""Reading LoRA files safely.

``.safetensors``: the header is parsed and validated by us (size, JSON, offsets) before any tensor is read, so a
truncated or hostile file becomes an ``UnreadableFile`` naming the problem. ``.pt/.bin/.ckpt``: only
``torch.load(weights_only=True)``; anything needing more is refused as ``UnsafePickle``; no code in a file runs.
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

__all__ = ["StateDict", "Header", "TensorInfo", "read_header", "read_metadata", "load_file", "load_pickle",
           "save_file"]

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def load_file(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Load all tensors and the metadata of a LoRA file (any supported container)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(p), {}
    header = read_header(p)  # validates before safetensors touches the data
    from safetensors.torch import load_file as st_load

    try:
        return st_load(str(p), device="cpu"), header.metadata
    except Exception as e:  # safetensors raises its own types; give ours instead
        raise UnreadableFile(p, f"safetensors could not read the tensors ({e})") from None


def load_pickle(path: str | Path) -> object:
    """The object in a ``.pt/.bin/.ckpt`` file, through ``torch.load(weights_only=True)`` only."""
    p = Path(path)
    file_size(p)
    try:
        with warnings.catch_warnings():  # legacy raw pickles load fine; torch's protocol notice only confuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _pickle_error(p, e) from None


def _load_pickle(p: Path) -> StateDict:
    tensors = _collect_tensors(load_pickle(p))
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
    reason = detail.group(1).strip().splitlines()[0] if detail else f"{type(e).__name__}: {msg.splitlines()[0]}"
    return UnreadableFile(p, f"not a readable torch file ({reason[:200]})")


def _collect_tensors(obj: object) -> StateDict:
    """Tensors of a loaded pickle: a flat dict, or one nested under ``state_dict``; non-tensors are ignored."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return {}
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}




_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


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
