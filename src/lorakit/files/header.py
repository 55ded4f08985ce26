"""safetensors headers, parsed and validated without torch (the LoRA library scans thousands of files)."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UnreadableFile

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


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
    size = file_size(p)
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableFile(p, f"file is {size} bytes long: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        check_header_length(p, n, size)
        raw = f.read(n)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFile(p, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UnreadableFile(p, "safetensors header is not a JSON object")
    return _parse_header(p, obj, 8 + n, size)


def check_header_length(p: Path, n: int, size: int) -> None:
    """The 8-byte length prefix must fit the file and safetensors' own limit."""
    if n > MAX_HEADER_BYTES or n + 8 > size:
        raise UnreadableFile(p, f"not a safetensors file or truncated: header claims {n} bytes, file has {size}")


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
    file_size(p)
    return {}


def file_size(p: Path) -> int:
    if not p.exists():
        raise UnreadableFile(p, "no such file")
    if not p.is_file():
        raise UnreadableFile(p, "not a regular file")
    return p.stat().st_size
