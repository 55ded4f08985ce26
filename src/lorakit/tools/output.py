"""Writing the tools' outputs: safetensors streamed to a temporary name and renamed (``files.output``: an
interrupted run leaves no half file, a device or FIFO is never replaced), kohya's ``sshs_*`` hashes computed on the bytes written, outputs that would replace an input refused,
and progress bars for long loops.

``sshs_model_hash`` is the SHA-256 of the data after the header and ``sshs_legacy_hash`` the first 8 hex digits of
the SHA-256 of the 0x10000 bytes at offset 0x100000 (sd-scripts ``train_util.addnet_hash_safetensors`` /
``addnet_hash_legacy``). sd-scripts computes both on a copy of the file that holds only the ``ss_*`` metadata, so
its legacy hash does not match its own file whenever other metadata is present; here both are taken from the file
as written (the header holds same-length placeholders while the data streams, then the real values), which is
what readers that verify them (sd-webui-additional-networks) compute.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch

from ..errors import ToolError
from ..files.output import atomic_file, check_writable

T = TypeVar("T")
LEGACY_START, LEGACY_LEN = 0x100000, 0x10000
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its key, dtype and shape up front (the header comes first) and how to get it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    get: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def entries_of(tensors: Mapping[str, torch.Tensor]) -> list[Entry]:
    return [Entry(k, t.dtype, tuple(t.shape), _const(t)) for k, t in tensors.items()]


def _const(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name.lower() not in DTYPES:
        raise ToolError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")
    return DTYPES[name.lower()]


def check_output(out: Path, inputs: Iterable[Path], *, folder: bool = False) -> None:
    """Before any work: refuse an output that is one of the inputs, inside an input folder, or a folder holding an
    input (``ToolError``), or that is not a regular file (``folder``: a folder) or cannot be written there
    (``OutputError``, from ``files.output.check_writable``). A folder output replaces the folder whole: an existing
    one must be a diffusers model folder (an earlier output), never any other folder."""
    check_writable(out, folder=folder)  # first: a symlink loop is an OutputError here, before resolve() meets it
    if folder and out.is_dir() and not (out / "model_index.json").is_file():  # bake swaps the whole folder
        raise ToolError(f"{out}: is a folder but not a diffusers model folder (no model_index.json); an output "
                        "folder is replaced whole, so give a new path (or a model folder lorakit wrote)")
    target = out.resolve()
    for src in inputs:
        try:
            s = Path(src).resolve()
        except (OSError, RuntimeError):  # an input in a symlink loop: its reader says so
            continue
        if target == s or s in target.parents or (s.exists() and target in s.parents):
            raise ToolError(f"{out}: the output would overwrite the input {src}; choose another output path")


def write_safetensors(path: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None, *,
                      sshs: bool = False, desc: str = "writing", finite: bool = False,
                      verify: Callable[[Path], object] | None = None) -> dict[str, str]:
    """Stream ``entries`` into ``path`` (sorted by key) through a temporary file; returns the final metadata.
    ``finite``: a floating tensor holding NaN or ±inf is a ``ToolError`` naming it (nothing is written);
    ``verify(temporary path)`` runs on the finished file before it is renamed onto ``path``."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if not k.startswith("sshs_")}
    ordered = sorted(entries, key=lambda e: e.key)
    if sshs:
        meta.update({"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8})
        if len(_header(ordered, meta)) >= LEGACY_START:  # the window would cover the header holding the value
            meta.pop("sshs_legacy_hash")
    header = _header(ordered, meta)
    with atomic_file(path, verify) as f:
        f.write(header)
        model_hash, legacy = _stream(f, ordered, len(header), desc, finite)
        if sshs:  # same-length values: the layout, and so both hashes, stay as computed
            meta["sshs_model_hash"] = model_hash
            if "sshs_legacy_hash" in meta:
                meta["sshs_legacy_hash"] = legacy
            f.seek(0)
            f.write(_header(ordered, meta))
    return meta


def _header(entries: Sequence[Entry], meta: Mapping[str, str]) -> bytes:
    obj: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    offset = 0
    for e in entries:
        if e.dtype not in ST_DTYPES:
            raise ToolError(f"tensor {e.key}: dtype {e.dtype} cannot be stored in safetensors")
        obj[e.key] = {"dtype": ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(obj, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _stream(f: BinaryIO, entries: Sequence[Entry], start: int, desc: str, finite: bool) -> tuple[str, str]:
    """Write the tensors; SHA-256 of all of them and of the bytes at [0x100000, 0x110000) of the file."""
    whole, legacy = hashlib.sha256(), hashlib.sha256()
    pos = start
    for e in bar(entries, desc=desc, total=len(entries)):
        t = e.get()
        if t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise ToolError(f"tensor {e.key}: got {t.dtype} {tuple(t.shape)}, announced {e.dtype} {e.shape}")
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ToolError(f"tensor {e.key}: holds NaN or infinite values (weights or inputs too large for "
                            f"{e.dtype}?); nothing was written")
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() \
            else memoryview(b"")
        f.write(raw)
        whole.update(raw)
        lo, hi = max(pos, LEGACY_START), min(pos + len(raw), LEGACY_START + LEGACY_LEN)
        if lo < hi:
            legacy.update(raw[lo - pos:hi - pos])
        pos += len(raw)
    return whole.hexdigest(), legacy.hexdigest()[:8]


def bar(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal (tqdm comes with transformers); the plain iterable else."""
    if not sys.stderr.isatty() or os.environ.get("LORAKIT_PROGRESS") == "0":
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of transformers
        return items
    return tqdm(items, desc=desc, total=total, unit="layer", leave=False, file=sys.stderr)  # type: ignore[no-any-return]
