"""safetensors headers, parsed and validated without torch (the LoRA library scans thousands of files).

The one reader of the project: ``read_header`` checks the whole schema before anything is used — a JSON object
nested at most ``MAX_JSON_DEPTH`` deep (checked before decoding, in linear time and a few bytes of memory per
byte: ``files.inputs``), ``__metadata__`` an object of strings, and per tensor ``dtype`` a known name, ``shape`` a list of non-negative integers (not bools, floats or
``Infinity``), ``data_offsets`` two integers ``[start, end]`` whose span is ``numel · itemsize`` — and the tensors
tile the data section exactly, as safetensors itself requires (so a truncated file is told from its size).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import UnreadableFile
from . import inputs

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_JSON_DEPTH = 8  # a valid header nests 3 deep (header → entry → shape); metadata JSON a few more
MAX_DIMS = 8  # no LoRA or checkpoint tensor has more
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
    return parse_header(p, raw, size)


def check_header_length(p: Path, n: int, size: int) -> None:
    """The 8-byte length prefix must fit the file and safetensors' own limit."""
    if n > MAX_HEADER_BYTES or n + 8 > size:
        raise UnreadableFile(p, f"not a safetensors file or truncated: header claims {n} bytes, file has {size}")


def parse_header(p: Path, raw: bytes, size: int) -> Header:
    """The validated header whose JSON is ``raw`` (the bytes after the length prefix) in a file of ``size`` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile(p, "safetensors header is not UTF-8") from None
    obj = decode_json(p, text, "safetensors header")
    if not isinstance(obj, dict):
        raise UnreadableFile(p, "safetensors header is not a JSON object")
    metadata = parse_metadata(p, obj.pop("__metadata__", None))
    data_start = 8 + len(raw)
    tensors = {key: tensor_info(p, key, info) for key, info in obj.items()}
    check_tiling(p, tensors, size - data_start)
    return Header(metadata, tensors, data_start)


def loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``files.inputs.loads_bounded`` (linear time, a few bytes of memory per byte of text) with the header's
    depth limit."""
    return inputs.loads_bounded(text, max_depth)


def decode_json(p: Path, text: str, what: str) -> Any:
    """``loads_bounded`` with the error as an ``UnreadableFile`` naming ``what``."""
    try:
        return loads_bounded(text)
    except ValueError as e:
        raise UnreadableFile(p, f"{what} is not valid JSON ({str(e)[:200]})") from None


def parse_metadata(p: Path, raw: object) -> dict[str, str]:
    """A decoded ``__metadata__`` value: absent/``null``, or an object whose values are strings."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UnreadableFile(p, f"safetensors __metadata__ is not an object (got {type(raw).__name__})")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise UnreadableFile(p, f"safetensors __metadata__ value of {key!r} is a {_json_type(value)}, not a "
                                    "string")
    return dict(raw)


def tensor_info(p: Path, key: str, info: object) -> TensorInfo:
    """One tensor entry, its schema checked: ``{"dtype": str, "shape": [int ≥ 0, …], "data_offsets": [start, end]}``
    with ``end − start == numel · itemsize``."""
    def bad(problem: str) -> UnreadableFile:
        return UnreadableFile(p, f"malformed safetensors entry for tensor {key!r}: {problem}")

    if not isinstance(info, dict):
        raise bad(f"a {_json_type(info)}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {_short(dtype)} (expected one of {', '.join(SAFETENSORS_DTYPES)})")
    if not _whole_numbers(shape) or len(shape) > MAX_DIMS:
        raise bad(f"shape must be a list of at most {MAX_DIMS} non-negative whole numbers, got {_short(shape)}")
    if not _whole_numbers(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise bad(f"data_offsets must be two whole numbers [start, end] with start ≤ end, got {_short(offsets)}")
    start, end = offsets
    need = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - start != need:
        raise bad(f"shape {shape} of {dtype} needs {need} bytes, data_offsets span {end - start}")
    return TensorInfo(dtype, tuple(shape), start, end)


def check_tiling(p: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """The tensors must cover the data section exactly, without gaps or overlaps (safetensors' own rule)."""
    at = 0
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.end > data_len:
            raise UnreadableFile(p, f"tensor {key!r} lies outside the file (its data ends at byte {info.end} of a "
                                    f"{data_len}-byte data section): truncated?")
        if info.start != at:
            what = "overlaps the previous tensor" if info.start < at else f"leaves a gap at byte {at}"
            raise UnreadableFile(p, f"malformed safetensors entry for tensor {key!r}: its data_offsets {what}")
        at = info.end
    if at != data_len:
        raise UnreadableFile(p, f"the tensors cover {at} bytes of a {data_len}-byte data section (extra bytes after "
                                "the last tensor)")


def _whole_numbers(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _json_type(value: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null")


def _short(value: object) -> str:
    """A JSON value for an error message, cut short (a hostile header's values can be megabytes long)."""
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value[:9] if isinstance(value, list) else value, default=str)
    return text if len(text) <= 60 and not (isinstance(value, list) and len(value) > 9) else text[:57] + "..."


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
