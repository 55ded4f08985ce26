"""Resolve the name in ``<lora:NAME>`` to a file of the LoRA library.

A name matches, in this order: the path below a folder without suffix (``style/ink``), the file stem (``ink``),
then the alias in the file's metadata (``ss_output_name``). Case is ignored. Several different files matching
is an error that lists them — never a guess; no match lists the closest names. Only indexed files can match, so
a name can never reach outside the library folders (``../x`` or an absolute path is just an unknown name).
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from ..errors import LoraNameError

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
ENV = "LORAKIT_LORA_DIRS"


class Named(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def subpath(self) -> str: ...

    @property
    def alias(self) -> str: ...


def lora_dirs_from_env() -> list[Path]:
    """Folders from ``$LORAKIT_LORA_DIRS`` (separated like ``PATH``)."""
    return [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]


E = TypeVar("E", bound=Named)


def resolve_name(entries: Sequence[E], name: str, dirs: Sequence[Path]) -> E:
    """The entry ``name`` means (one file: the same file reached through two folders is one match)."""
    key = name.strip().replace("\\", "/").lower()
    for field in ("subpath", "stem", "alias"):
        found = sorted({e.path for e in entries if _field(e, field).lower() == key})
        if len(found) == 1:
            return next(e for e in entries if e.path == found[0] and _field(e, field).lower() == key)
        if found:
            sub = next(e.subpath for e in entries if e.path == found[0])
            raise LoraNameError(f"LoRA name {name!r} is ambiguous: it is the {field} of "
                                f"{', '.join(str(p) for p in found)}; write the sub-path (e.g. {sub!r})")
    where = ", ".join(str(d) for d in dirs) or "(no LoRA folder given: use --lora-dir)"
    names = sorted({e.subpath for e in entries} | {e.path.stem for e in entries})
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise LoraNameError(f"no LoRA named {name!r} in {where}{hint}")


def _field(e: Named, field: str) -> str:
    if field == "stem":
        return e.path.stem
    return str(getattr(e, field) or "")
