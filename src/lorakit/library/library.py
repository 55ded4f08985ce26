"""A library of LoRA folders: recursive scan, SQLite index, names, metadata, trigger words, previews, hashes.

``Library(dirs).refresh()`` walks the folders (symlinked folders followed once), compares each file's size and
mtime with the index and parses only new or changed headers — in worker processes when there are many. Sidecar
files (previews, ``.civitai.info``, A1111's ``NAME.json``) are re-read when theirs change. Importing and
scanning need no torch (pickled ``.pt``/``.bin`` LoRAs load it when first summarised). What is listed is what
loads: a file that fails its summary's checks (``summary``: truncated, malformed, no LoRA layers) is listed with
its ``error``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..keymap.arch import Arch
from .names import SUFFIXES, LoraNameError, resolve_name
from .sidecars import Sidecars, read_sidecars, sidecars_by_stem
from .store import Store
from .summary import read_metadata_fast, summarise
from .training import caption_triggers, merge_phrases, training_summary, trigger_words

PARALLEL_FROM = 200  # files to parse before worker processes pay for themselves
WORKERS = 4


@dataclass
class Found:
    """A LoRA file seen by the walk."""

    file: str
    root: Path
    size: int
    mtime_ns: int
    sidecars: str  # signature: "name:mtime_ns|…" of the sidecars present
    present: frozenset[str]  # the sidecar names that exist

    @property
    def path(self) -> Path:
        return Path(self.file)


@dataclass
class LoraEntry:
    file: str
    root: Path
    subpath: str  # below its folder, '/'-separated, without suffix
    size: int
    raw_info: str = "{}"  # the index's JSON, decoded on first use (a warm scan of 10,000 files decodes none)

    @cached_property
    def path(self) -> Path:
        return Path(self.file)

    @cached_property
    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.raw_info))

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def id(self) -> str:
        return hashlib.sha1(str(self.path).encode()).hexdigest()[:16]

    @property
    def alias(self) -> str:
        return str(self.info.get("alias") or "")

    @property
    def error(self) -> str | None:
        """Why the file cannot be used (it is listed, never hidden), or ``None``."""
        return self.info.get("error") or None

    @property
    def base(self) -> str:
        """The file's shapes (its metadata when they say nothing); only when both say nothing, the user's
        ``sd version`` or Civitai's ``baseModel`` (a sidecar never overrides what the file shows)."""
        base = str(self.info.get("base", Arch.UNKNOWN))
        return base if base != Arch.UNKNOWN else str(self.sidecars.sd_version or Arch.UNKNOWN)

    @property
    def variant(self) -> str | None:
        """The finer base the file shows (FLUX.1: ``flux-1-dev``, ``flux-1-schnell``, ``flux-1-dev-control``,
        ``flux-1-fill-dev``, or ``flux-1`` when nothing tells dev from schnell); ``None`` for other bases."""
        return self.info.get("variant") or None

    @cached_property
    def sidecars(self) -> Sidecars:
        return Sidecars(**self.info.get("sidecars", {}))

    @cached_property
    def trigger_phrases(self) -> list[str]:
        """The phrases someone declared as triggers — A1111's activation text, Civitai's ``trainedWords``, the
        file's ``modelspec.trigger_phrase``, in that order — each split at commas (``"ink, mono"`` is two) and
        each once, case-blind. What auto-apply adds (never mere frequent training tags)."""
        side = self.sidecars
        return merge_phrases([[side.activation_text], side.trained_words, [self.info.get("trigger_phrase") or ""]])

    @property
    def explicit_trigger_words(self) -> list[str]:
        """``trigger_phrases`` (the name callers used first)."""
        return self.trigger_phrases

    @property
    def trained_trigger_words(self) -> list[str]:
        """``trigger_phrases``, then the training tags every caption had (``caption_triggers``): what a card shows
        as the trigger, apart from the other caption tags."""
        return merge_phrases([self.trigger_phrases, self.info.get("caption_triggers", [])])

    @property
    def trigger_words(self) -> list[str]:
        """``trigger_phrases``, then the most frequent training tags, each once (case-blind)."""
        return merge_phrases([self.trigger_phrases, self.info.get("triggers", [])])


class Library:
    """LoRA files in ``dirs``, indexed in ``index`` (default ``~/.cache/lorakit/library.sqlite3``)."""

    def __init__(self, dirs: Iterable[str | Path], index: str | Path | None = None, scan: bool = True) -> None:
        self.dirs = [Path(d) for d in dirs]
        for root in self.dirs:
            if not root.is_dir():
                raise LoraNameError(f"{root}: LoRA folder does not exist")
        self.store = Store(index)
        self.entries: list[LoraEntry] = []
        self._by_file: dict[str, LoraEntry] = {}
        self.last_scan: dict[str, float] = {}
        if scan:
            self.refresh()

    def refresh(self) -> dict[str, float]:
        """Re-scan the folders; returns counts and seconds (``files``, ``parsed``, ``sidecars``, ``removed``)."""
        t0 = time.perf_counter()
        found = [f for root in self.dirs for f in walk(root)]
        known = self.store.rows()
        changed = [f for f in found if (k := known.get(f.file)) is None or k[:2] != (f.size, f.mtime_ns)]
        side_only = [f for f in found if (k := known.get(f.file)) and k[:2] == (f.size, f.mtime_ns)
                     and k[2] != f.sidecars]
        rows = _parse_all(changed)
        infos = {r[0]: r[4] for r in rows}
        for f in side_only:
            info = json.loads(known[f.file][3])
            info["sidecars"] = _sidecars_info(f)
            infos[f.file] = json.dumps(info)
            self.store.update_info(f.file, f.sidecars, infos[f.file])
        seen = {f.file for f in found}
        gone = [p for p in known if p not in seen and any(_under(p, r) for r in self.dirs)]
        self.store.write(rows, gone)
        self.entries = [LoraEntry(f.file, f.root, _subpath(f), f.size, infos.get(f.file) or known[f.file][3])
                        for f in found]
        self._by_file = {e.file: e for e in self.entries}
        self.last_scan = {"files": len(found), "parsed": len(changed), "sidecars": len(side_only),
                          "removed": len(gone), "seconds": time.perf_counter() - t0}
        return self.last_scan

    def resolve(self, name: str) -> LoraEntry:
        """The entry (``.path``: its file) a prompt's ``<lora:NAME>`` means; only files inside the library folders
        can match. A name not found triggers one re-scan (a file just added) before the error."""
        try:
            return resolve_name(self.entries, name, self.dirs)
        except LoraNameError:
            self.refresh()
            return resolve_name(self.entries, name, self.dirs)

    def entry(self, path: str | Path | LoraEntry) -> LoraEntry:
        """The entry of a file of the library (an entry stands for itself)."""
        if isinstance(path, LoraEntry):
            return path
        if str(path) in self._by_file:
            return self._by_file[str(path)]
        for e in self.entries:
            if e.path == Path(path):
                return e
        raise LoraNameError(f"{path}: not in the LoRA library")

    def by_id(self, entry_id: str) -> LoraEntry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise LoraNameError(f"no LoRA with id {entry_id!r}")

    def metadata(self, entries: list[LoraEntry]) -> list[dict[str, str]]:
        """The files' full metadata: read from the headers on first request, then kept in the index (a cold scan
        does not store it: tens of KB of tag lists per file would make it half as fast again)."""
        stored = self.store.metadata([e.file for e in entries])
        fresh = [(e.file, json.dumps(_file_metadata(e))) for e in entries if e.file not in stored]
        if fresh:
            self.store.set_metadata(fresh)
            stored.update(fresh)
        return [dict(json.loads(stored[e.file])) for e in entries]

    def hashes(self, entry: LoraEntry) -> dict[str, str]:
        """SHA-256 (AutoV2 = first 10 hex) and the A1111 short hash, computed once per file version and kept in
        the one hash cache (``files.hashes.HashCache``, in the index file)."""
        h = self.store.hash_cache.hashes(entry.path)
        return {"sha256": h.sha256, "autov2": h.autov2, "addnet": h.addnet, "a1111_short": h.a1111_short}

    def search(self, base: str | None = None, text: str | None = None) -> list[LoraEntry]:
        """Entries in sub-path order; ``base`` matches the base (``flux1``) or the variant (``flux-1-dev``)."""
        needle = (text or "").lower()
        return [e for e in sorted(self.entries, key=lambda e: e.subpath.lower())
                if (not base or base in (e.base, e.variant)) and (not needle or needle in _haystack(e))]


def _file_metadata(e: LoraEntry) -> dict[str, str]:
    if e.path.suffix.lower() != ".safetensors":
        return {}
    try:
        return read_metadata_fast(e.path)
    except LorakitError:
        return {}


def _haystack(e: LoraEntry) -> str:
    return " ".join([e.subpath, e.alias, *e.trigger_words, e.sidecars.description]).lower()


def _subpath(f: Found) -> str:
    rel = f.file[len(str(f.root).rstrip(os.sep)) + 1:]
    return rel.rsplit(".", 1)[0].replace(os.sep, "/")


def _under(path: str, root: Path) -> bool:
    return path.startswith(str(root).rstrip(os.sep) + os.sep)


def walk(root: Path) -> list[Found]:
    """LoRA files below ``root`` in name order; symlinked folders are followed, each real folder once."""
    out: list[Found] = []
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:  # a symlink that loops or leads nowhere is no entry (is_dir raises)
                items = sorted((d for d in it if not d.is_symlink() or os.path.exists(d.path)), key=lambda d: d.name)
        except OSError:
            continue  # an unreadable sub-folder is skipped, not fatal
        loras = [d for d in items if d.name.lower().endswith(SUFFIXES)]
        sidecars = sidecars_by_stem(d.name for d in items if not d.name.lower().endswith(SUFFIXES))
        names = {d.name: d for d in items} if sidecars else {}
        stack.extend(d.path for d in reversed(items) if d.is_dir())
        for d in loras:
            if not d.is_file():
                continue
            st = d.stat()
            present = sidecars.get(d.name.rsplit(".", 1)[0], [])
            sig = "|".join(f"{n}:{names[n].stat().st_mtime_ns}" for n in present)
            out.append(Found(d.path, root, st.st_size, st.st_mtime_ns, sig, frozenset(present)))
    return out


def _parse_all(files: list[Found]) -> list[tuple[str, int, int, str, str]]:
    if len(files) < PARALLEL_FROM or (os.cpu_count() or 1) < 2:
        return [_parse(f) for f in files]
    import multiprocessing

    # fork is fast, but forking a process with other threads (a server) can copy a lock held mid-operation
    method = "fork" if hasattr(os, "fork") and threading.active_count() == 1 else "spawn"
    ctx = multiprocessing.get_context(method)
    # More workers than cores: a cold disk is latency-bound, and each worker keeps one read in flight.
    with ctx.Pool(WORKERS) as pool:
        return pool.map(_parse, files, chunksize=max(16, len(files) // (WORKERS * 8)))


def _sidecars_info(f: Found) -> dict[str, Any]:
    return read_sidecars(f.path.parent, f.path.stem, set(f.present)).as_dict() if f.present else {}


def _parse(f: Found) -> tuple[str, int, int, str, str]:
    """One index row: ``(path, size, mtime_ns, sidecar signature, info JSON)``. An unreadable file
    is indexed with its error (listed, never hidden)."""
    info: dict[str, Any]
    metadata: dict[str, str] = {}
    try:
        s = summarise(f.path)
        metadata = s.metadata
        info = s.info()
    except LorakitError as e:
        info = {"base": Arch.UNKNOWN, "types": [], "error": str(e)}
    except Exception as e:  # a pickle that torch cannot read raises torch's own types
        info = {"base": Arch.UNKNOWN, "types": [], "error": f"{f.path}: unreadable ({type(e).__name__}: {e})"}
    info["alias"] = metadata.get("ss_output_name", "")
    info["trigger_phrase"] = metadata.get("modelspec.trigger_phrase", "").strip()
    info["triggers"] = trigger_words(metadata)
    info["caption_triggers"] = caption_triggers(metadata)
    info["training"] = training_summary(metadata)
    info["sidecars"] = _sidecars_info(f)
    return (f.file, f.size, f.mtime_ns, f.sidecars, json.dumps(info))
