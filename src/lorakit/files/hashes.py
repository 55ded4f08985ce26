"""File hashes as the LoRA tools show them, computed in one pass over the file.

- ``sha256``: of the whole file; AutoV2 (Civitai/A1111 model hash) is its first 10 hex digits.
- ``addnet``: SHA-256 of the tensor bytes after the safetensors header (kohya's hash, stable when metadata is
  edited); A1111's short hash of a LoRA is its first 12 hex digits (for pickles A1111 uses the whole-file hash).
- ``sshs_model_hash``: what the file's metadata claims (lycoris-lora 4.x writes values that are not this hash).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class Hashes:
    sha256: str
    autov2: str
    addnet: str
    a1111_short: str
    sshs_model_hash: str | None
    sshs_matches: bool | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def file_hashes(path: str | Path, metadata: dict[str, str] | None = None) -> Hashes:
    p = Path(path)
    whole, tail = hashlib.sha256(), hashlib.sha256()
    with p.open("rb") as f:
        skip = 0
        if p.suffix.lower() == ".safetensors":
            head = f.read(8)
            whole.update(head)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            header = f.read(n)
            whole.update(header)
            skip = 1
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            tail.update(chunk)
    full = whole.hexdigest()
    addnet = tail.hexdigest() if skip else full
    claimed = (metadata or {}).get("sshs_model_hash")
    return Hashes(full, full[:10], addnet, addnet[:12], claimed,
                  None if claimed is None else claimed.lower() == addnet)


def cached_sha256(path: str | Path) -> str:
    """SHA-256 of a (large) file, cached in ``~/.cache/lorakit/sha256.json`` by path, size and mtime."""
    import json
    import os

    p = Path(path).resolve()
    st = p.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorakit" / "sha256.json"
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        cache[key] = h.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
        except OSError:
            pass  # an unwritable cache only costs time
    return str(cache[key])
