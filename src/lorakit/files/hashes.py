"""File hashes as the LoRA tools show them, and the one cache that keeps them.

- ``sha256``: of the whole file; AutoV2 (Civitai/A1111 model hash) is its first 10 hex digits.
- ``addnet``: SHA-256 of the tensor bytes after the safetensors header (kohya's hash, stable when metadata is
  edited); A1111's short hash of a LoRA is its first 12 hex digits (for pickles A1111 uses the whole-file hash).
- ``sshs_model_hash``: what the file's metadata claims (lycoris-lora 4.x writes values that are not this hash).

Hashing a 2 GB checkpoint takes seconds, so every caller — the base model's hash, fast-LoRA (LCM) detection,
the library's and ``inspect``'s LoRA hashes — goes through ``HashCache``: one SQLite table (``hashes``) keyed by
the file's real path and checked against its size and mtime (a changed file is hashed again). It lives in the
library's index file (``$XDG_CACHE_HOME/lorakit/library.sqlite3``); a ``Library`` with its own index keeps it there.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UnreadableFile

CHUNK = 1 << 20
TABLE = """CREATE TABLE IF NOT EXISTS hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, addnet TEXT)"""


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

    @classmethod
    def of(cls, sha256: str, addnet: str, metadata: dict[str, str] | None = None) -> Hashes:
        """From the two digests; ``metadata``'s ``sshs_model_hash`` is compared with ``addnet``."""
        claimed = (metadata or {}).get("sshs_model_hash")
        return cls(sha256, sha256[:10], addnet, addnet[:12], claimed,
                   None if claimed is None else claimed.lower() == addnet)


def digests(path: str | Path, addnet: bool = True) -> tuple[str, str | None]:
    """``(sha256 of the file, addnet)`` in one pass; ``addnet`` is ``None`` when not asked for (a checkpoint's
    hash needs only the first: half the hashing work)."""
    p = Path(path)
    whole = hashlib.sha256()
    tail = hashlib.sha256() if addnet and p.suffix.lower() == ".safetensors" else None
    with p.open("rb") as f:
        if tail is not None:
            head = f.read(8)
            whole.update(head)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            whole.update(f.read(n))
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            if tail is not None:
                tail.update(chunk)
    full = whole.hexdigest()
    return full, (tail.hexdigest() if tail is not None else full if addnet else None)


def file_hashes(path: str | Path, metadata: dict[str, str] | None = None) -> Hashes:
    """Computed now, never cached (``HashCache.hashes`` is the cached way)."""
    sha, addnet = digests(path)
    return Hashes.of(sha, addnet or sha, metadata)


class HashCache:
    """Hashes kept in the ``hashes`` table of an SQLite database (the connection may be shared, under ``lock``)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock | None = None) -> None:
        self.db, self.lock = db, lock or threading.Lock()
        with self.lock, self.db:
            self.db.execute(TABLE)

    def sha256(self, path: str | Path) -> str:
        """The whole file's SHA-256 (a model's hash: AutoV2 is its first 10 hex digits)."""
        return self._get(path, addnet=False)[0]

    def hashes(self, path: str | Path, metadata: dict[str, str] | None = None) -> Hashes:
        sha, addnet = self._get(path, addnet=True)
        return Hashes.of(sha, addnet or sha, metadata)

    def _get(self, path: str | Path, addnet: bool) -> tuple[str, str | None]:
        real = os.path.realpath(path)  # one row per file, whichever folder or link it was reached through
        try:
            st = os.stat(real)
            with self.lock:
                row = self.db.execute("SELECT sha256, addnet FROM hashes WHERE path = ? AND size = ? AND "
                                      "mtime_ns = ?", (real, st.st_size, st.st_mtime_ns)).fetchone()
            if row is not None and (row[1] is not None or not addnet):
                return str(row[0]), row[1]
            sha, tail = digests(real, addnet)
        except OSError as e:
            raise UnreadableFile(path, f"cannot read it to hash it ({e.strerror})") from None
        try:
            with self.lock, self.db:
                self.db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)",
                                (real, st.st_size, st.st_mtime_ns, sha, tail))
        except sqlite3.Error:
            pass  # a read-only or busy cache only costs time
        return sha, tail


def cache_db_path() -> Path:
    """The library's index file, which also holds the hash cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lorakit" / "library.sqlite3"


_DEFAULT: dict[Path, HashCache] = {}
_DEFAULT_LOCK = threading.Lock()


def default_cache() -> HashCache:
    """The process's hash cache in ``cache_db_path()`` (opened once per path; in memory when that cannot be
    written: hashes are then kept for this process only)."""
    target = cache_db_path()
    with _DEFAULT_LOCK:
        if target not in _DEFAULT:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(target), check_same_thread=False, timeout=30)
                db.execute("PRAGMA journal_mode=WAL")
                _DEFAULT[target] = HashCache(db)
            except (OSError, sqlite3.Error):
                _DEFAULT[target] = HashCache(sqlite3.connect(":memory:", check_same_thread=False))
        return _DEFAULT[target]


def cached_sha256(path: str | Path) -> str:
    """SHA-256 of a (large) file through the one hash cache."""
    return default_cache().sha256(path)


def cached_hashes(path: str | Path, metadata: dict[str, str] | None = None) -> Hashes:
    """All hashes of a LoRA file through the one hash cache."""
    return default_cache().hashes(path, metadata)
