"""The library's SQLite index (stdlib ``sqlite3``): one row per LoRA file, keyed by path and validated by size and
mtime, so a re-scan parses only what changed. ``info`` is a small JSON summary (what listings need);
the full metadata (often tens of KB of tag lists) is filled in lazily, on first request (``INSERT OR REPLACE`` of
a changed file clears it). The same file holds the one hash cache (``files.hashes.HashCache``, table ``hashes``)."""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from ..files.hashes import HashCache, cache_db_path

SCHEMA = """CREATE TABLE IF NOT EXISTS loras (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sidecars TEXT NOT NULL,
    info TEXT NOT NULL, metadata TEXT)"""
VERSION = 6  # bump when the info layout or a base changes (6: SD3 sizes): old rows are dropped (hashes kept)


def default_index_path() -> Path:
    return cache_db_path()


class Store:
    def __init__(self, path: Path | str | None = None) -> None:
        target = str(path) if path is not None else str(default_index_path())
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(target, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if self.db.execute("PRAGMA user_version").fetchone()[0] != VERSION:
            self.db.execute("DROP TABLE IF EXISTS loras")
            self.db.execute(f"PRAGMA user_version={VERSION}")
        self.db.execute(SCHEMA)
        self.db.commit()
        self.hash_cache = HashCache(self.db, self.lock)

    def rows(self) -> dict[str, tuple[int, int, str, str]]:
        """path → (size, mtime_ns, sidecar signature, info JSON)."""
        with self.lock:
            cur = self.db.execute("SELECT path, size, mtime_ns, sidecars, info FROM loras")
            return {r[0]: (r[1], r[2], r[3], r[4]) for r in cur}

    def write(self, rows: Iterable[tuple[str, int, int, str, str]], gone: Iterable[str]) -> None:
        """Insert/replace ``(path, size, mtime_ns, sidecars, info)`` rows and delete ``gone`` paths."""
        with self.lock, self.db:
            self.db.executemany("INSERT OR REPLACE INTO loras (path, size, mtime_ns, sidecars, info) "
                                "VALUES (?, ?, ?, ?, ?)", rows)
            self.db.executemany("DELETE FROM loras WHERE path = ?", ((p,) for p in gone))

    def update_info(self, path: str, sidecars: str, info: str) -> None:
        with self.lock, self.db:
            self.db.execute("UPDATE loras SET sidecars = ?, info = ? WHERE path = ?", (sidecars, info, path))

    def metadata(self, paths: list[str]) -> dict[str, str]:
        """path → metadata JSON, for the paths whose metadata is stored."""
        out: dict[str, str] = {}
        with self.lock:
            for i in range(0, len(paths), 500):  # SQLite's bound-parameter limit is larger; 500 keeps it portable
                chunk = paths[i:i + 500]
                marks = ",".join("?" * len(chunk))
                out.update(self.db.execute(f"SELECT path, metadata FROM loras WHERE metadata IS NOT NULL AND path IN "
                                           f"({marks})", chunk).fetchall())
        return out

    def set_metadata(self, items: list[tuple[str, str]]) -> None:
        with self.lock, self.db:
            self.db.executemany("UPDATE loras SET metadata = ? WHERE path = ?", ((m, p) for p, m in items))
