"""Reading LoRA files safely.

``.safetensors``: the header is parsed and validated by us (size, JSON, offsets) before any tensor is read, so a
truncated or hostile file becomes an ``UnreadableFile`` naming the problem. ``.pt/.bin/.ckpt``: only
``torch.load(weights_only=True)``; anything needing more is refused as ``UnsafePickle``; no code in a file runs.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LoraFileError, UnreadableFile, UnsafePickle

StateDict = dict[str, torch.Tensor]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: metadata strings and tensor descriptors; ``data_start`` is the byte offset of
    the tensor data (8 + header length)."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header without reading tensor data."""
    p = Path(path)
    size = _file_size(p)
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableFile(p, f"file is {size} bytes long: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise UnreadableFile(p, f"not a safetensors file or truncated: header claims {n} bytes, file has {size}")
        raw = f.read(n)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFile(p, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UnreadableFile(p, "safetensors header is not a JSON object")
    return _parse_header(p, obj, 8 + n, size)


def _parse_header(p: Path, obj: dict[str, Any], data_start: int, size: int) -> Header:
    meta_raw = obj.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict):
        raise UnreadableFile(p, "safetensors __metadata__ is not an object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta_raw.items()}
    tensors: dict[str, TensorInfo] = {}
    for key, info in obj.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise UnreadableFile(p, f"malformed safetensors entry for tensor {key!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise UnreadableFile(p, f"tensor {key!r} has unknown dtype {dtype!r}")
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * SAFETENSORS_DTYPES[dtype] or start < 0 or data_start + end > size:
            raise UnreadableFile(p, f"tensor {key!r} lies outside the file or has the wrong byte size (truncated?)")
        tensors[key] = TensorInfo(dtype, shape, int(start), int(end))
    return Header(metadata, tensors, data_start)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a file: the safetensors header's ``__metadata__``; ``{}`` for pickles."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        return read_header(p).metadata
    _file_size(p)
    return {}


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


def _load_pickle(p: Path) -> StateDict:
    _file_size(p)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _pickle_error(p, e) from None
    tensors = _collect_tensors(obj)
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


def _file_size(p: Path) -> int:
    if not p.exists():
        raise UnreadableFile(p, "no such file")
    if not p.is_file():
        raise UnreadableFile(p, "not a regular file")
    return p.stat().st_size


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
