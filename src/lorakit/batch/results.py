"""``results.jsonl``: one JSON line per finished item of a batch, appended as items finish and read back by a
re-run to skip what is done.

Read in bounded memory and time: line by line, each at most ``MAX_LINE`` bytes, JSON nested at most
``MAX_DEPTH`` levels. A line counts when it is a JSON object with a string ``key``; the item is finished when the
record has no ``error`` and ``images`` is a non-empty list of plain file names (no folders: a record cannot point
lorakit elsewhere) that all exist in the output folder — anything else (``"images": 5``) runs the item again.
Unreadable lines — a torn last line from a crash, a line too long or too deep — are dropped by rewriting the file
without them (atomically). The file must be a regular file or absent: a folder, FIFO or device in its place is a
``BatchError``, never opened (appending to a FIFO blocks until someone reads it).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import BatchError, OutputError
from ..files.inputs import loads_bounded
from ..files.output import check_target, write_atomic
from ..server.guards import MAX_DEPTH

RESULTS = "results.jsonl"
MAX_LINE = 16 * 2 ** 20  # one item's record: its infotexts, prompt and settings (a few KB per image)


def results_path(outdir: Path) -> Path:
    """``outdir/results.jsonl``, which must be a regular file or absent (``BatchError`` otherwise)."""
    path = outdir / RESULTS
    try:
        check_target(path)
    except OutputError as e:
        raise BatchError(f"{e}; move it away to run the batch here") from None
    return path


def finished(outdir: Path) -> set[str]:
    """Keys finished in earlier runs (no error, every image there). Drops unreadable lines by rewriting the file
    without them (atomically)."""
    path = results_path(outdir)
    if not path.exists():
        return set()
    keys, dropped = set(), False
    for raw, record in _records(path):
        if record is None:
            dropped = True
        elif _done(record, outdir):
            keys.add(record["key"])
        if record is not None and not raw.endswith(b"\n"):
            dropped = True  # a last line without its newline: rewritten with it
    if dropped:
        write_atomic(path, lambda tmp: _write_kept(path, tmp))
    return keys


def _records(path: Path) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Each non-blank line and its record (``None``: unreadable, too long, too deep, or not a keyed object)."""
    try:
        with path.open("rb") as f:
            yield from ((raw, _record(raw)) for raw in _lines(f) if raw.strip())
    except OSError as e:
        raise BatchError(f"{path}: cannot be read ({e.strerror or e})") from None


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """The file's lines; a line longer than ``MAX_LINE`` comes as ``b"\\0"`` (never a record), read past in
    chunks without being held."""
    while raw := f.readline(MAX_LINE + 1):
        if len(raw) <= MAX_LINE or raw.endswith(b"\n"):
            yield raw
            continue
        while (more := f.readline(MAX_LINE)) and not more.endswith(b"\n"):
            pass
        yield b"\0\n"


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = loads_bounded(raw.decode("utf-8"), MAX_DEPTH)
    except ValueError:  # UnicodeDecodeError is one
        return None
    return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None


def _done(record: dict[str, Any], outdir: Path) -> bool:
    images = record.get("images")
    return "error" not in record and isinstance(images, list) and bool(images) and all(
        isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n and "\0" not in n
        and (outdir / n).is_file() for n in images)


def _write_kept(path: Path, tmp: Path) -> None:
    with tmp.open("wb") as out:
        for raw, record in _records(path):
            if record is not None:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")


class ResultsWriter:
    """Appends one record a line to ``results.jsonl`` (one write each, fsynced)."""

    def __init__(self, outdir: Path) -> None:
        path = results_path(outdir)
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise BatchError(f"{path}: cannot be written ({e.strerror or e})") from None

    def append(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
