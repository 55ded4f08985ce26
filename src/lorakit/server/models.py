"""The base models a server can switch between (A1111's ``/sdapi/v1/sd-models``), and its persisted options.

Models: the embedded demo model, the one the server started with, and every checkpoint in the ``--models-dir``
folders — single files (``.safetensors``, ``.ckpt``, ``.gguf``) and diffusers folders (``model_index.json``), found
recursively. A title is A1111's: the path relative to its folder, with ``[hash]`` once the hash is known (the
loaded model's); a client may name a model by title (with or without the hash), by name (the stem) or by hash.

Options posted to ``/sdapi/v1/options`` are saved (JSON, written to a temporary name and renamed) and read back
when the server starts, as A1111's ``config.json``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..files.inputs import loads_bounded, read_limited
from ..files.output import write_atomic
from .guards import MAX_DEPTH

log = logging.getLogger("lorakit.server")
SUFFIXES = (".safetensors", ".ckpt", ".gguf")  # .gguf: quantized FLUX.1 / SD UNets (with --components)
MAX_MODELS = 10_000
DEFAULT_OPTIONS_FILE = Path("~/.config/lorakit/server-options.json").expanduser()
MAX_OPTIONS_BYTES = 4 * 2 ** 20  # A1111's config.json is a few KB
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


@dataclass(frozen=True)
class ModelEntry:
    title: str  # relative path with suffix (A1111's title without the hash); "demo" for the embedded model
    name: str  # the stem
    spec: str | None  # what ``load_model`` takes: a path, or None for the demo model

    def a1111(self, hash_: str | None) -> dict[str, Any]:
        return {"title": f"{self.title} [{hash_}]" if hash_ else self.title, "model_name": self.name,
                "hash": hash_, "sha256": None, "filename": self.spec or "demo", "config": None}


class ModelCatalog:
    """The models in ``dirs`` plus the demo model and the running one (``current``)."""

    def __init__(self, dirs: list[Path], current: ModelEntry) -> None:
        for d in dirs:
            if not d.is_dir():
                raise ModelError(f"{d}: models folder does not exist")
        self.dirs = dirs
        self.current = current
        self.entries: list[ModelEntry] = []
        self.refresh()

    def refresh(self) -> None:
        """Scan the folders again."""
        found: dict[str, ModelEntry] = {"demo": ModelEntry("demo", "demo", None)}
        for root in self.dirs:
            for entry in _scan(root):
                found.setdefault(entry.title, entry)
        found.setdefault(self.current.title, self.current)
        self.entries = list(found.values())

    def find(self, name: str) -> ModelEntry:
        """The entry a client named; ``ModelError`` listing what there is otherwise."""
        wanted = HASH_SUFFIX.sub("", name.strip())
        for entry in self.entries:
            if wanted in (entry.title, entry.name) or (entry.spec and wanted == entry.spec):
                return entry
        listed = ", ".join(repr(e.title) for e in self.entries[:20])
        more = f" and {len(self.entries) - 20} more" if len(self.entries) > 20 else ""
        raise ModelError(f"model {name[:200]!r} not found; available: {listed}{more} (GET /sdapi/v1/sd-models; "
                         "POST /sdapi/v1/refresh-checkpoints after adding files)")


def entry_for(spec: str | None, dirs: list[Path]) -> ModelEntry:
    """The catalog entry of the model the server starts with (a path, or None/"demo")."""
    if spec in (None, "demo"):
        return ModelEntry("demo", "demo", None)
    path = Path(str(spec))
    for root in dirs:
        try:
            title = path.resolve().relative_to(root.resolve()).as_posix()
            return ModelEntry(title, _stem(path), str(path))
        except (ValueError, OSError, RuntimeError):  # outside the folder; a symlink loop (RuntimeError before 3.13)
            continue  # a path that cannot be loaded is the loader's ModelError, when the server loads it
    return ModelEntry(path.name, _stem(path), str(path))


def _stem(path: Path) -> str:
    return path.stem if path.suffix.lower() in SUFFIXES else path.name


def _scan(root: Path) -> list[ModelEntry]:
    out: list[ModelEntry] = []
    for folder, subdirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        if (here / "model_index.json").is_file():
            out.append(ModelEntry(here.relative_to(root).as_posix() or here.name, here.name, str(here)))
            subdirs.clear()  # a diffusers folder's own subfolders are its parts
            continue
        subdirs.sort()
        for name in sorted(files):
            if name.lower().endswith(SUFFIXES):
                path = here / name
                out.append(ModelEntry(path.relative_to(root).as_posix(), _stem(path), str(path)))
        if len(out) > MAX_MODELS:
            log.warning(f"{root}: more than {MAX_MODELS} models; the rest are not listed")
            break
    return out[:MAX_MODELS]


def load_options(path: Path | None) -> dict[str, Any]:
    """The saved options, or ``{}`` (a missing file; an unreadable one is logged and ignored)."""
    if path is None or not os.path.lexists(path):
        return {}
    try:
        data = loads_bounded(read_limited(path, MAX_OPTIONS_BYTES).decode("utf-8"), MAX_DEPTH)
    except ValueError as e:  # not a regular file, too big, not UTF-8, not JSON, too deep
        log.warning(f"{path}: saved options unreadable ({str(e)[:200]}); starting with the defaults")
        return {}
    if not isinstance(data, dict):
        log.warning(f"{path}: saved options are not a JSON object; starting with the defaults")
        return {}
    return data


def save_options(path: Path | None, options: dict[str, Any]) -> None:
    """Write ``options`` to ``path`` atomically (nothing when ``path`` is None)."""
    if path is not None:
        text = json.dumps(options, indent=1, sort_keys=True)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
