"""Resolve the name in ``<lora:NAME>`` to a file in one or more LoRA folders.

A name matches, in this order: the path below a folder without suffix (``style/ink``), the file stem (``ink``),
then the alias in the file's metadata (``ss_output_name``). Case is ignored. Several different files matching
is an error that lists them — never a guess; no match lists the closest names.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorakitError
from ..header import read_metadata

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
ENV = "LORAKIT_LORA_DIRS"


class LoraNameError(LorakitError):
    """A LoRA name that matches no file, or several."""


@dataclass(frozen=True)
class LoraFile:
    path: Path
    subpath: str  # relative to its folder, '/'-separated, without suffix

    @property
    def stem(self) -> str:
        return self.path.stem


def lora_dirs_from_env() -> list[Path]:
    """Folders from ``$LORAKIT_LORA_DIRS`` (separated like ``PATH``)."""
    return [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]


class LoraIndex:
    def __init__(self, dirs: Iterable[str | Path]) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.files: list[LoraFile] = []
        for root in self.dirs:
            if not root.is_dir():
                raise LoraNameError(f"{root}: LoRA folder does not exist")
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() in SUFFIXES and path.is_file():
                    self.files.append(LoraFile(path, path.relative_to(root).with_suffix("").as_posix()))
        self._aliases: dict[Path, str] | None = None

    def resolve(self, name: str) -> Path:
        key = name.strip().replace("\\", "/").lower()
        for field in ("subpath", "stem", "alias"):
            found = sorted({f.path for f in self.files if self._field(f, field).lower() == key})
            if len(found) == 1:
                return found[0]
            if found:
                raise LoraNameError(f"LoRA name {name!r} is ambiguous: it is the {field} of "
                                    f"{', '.join(str(p) for p in found)}; write the sub-path (e.g. "
                                    f"{self._subpath(found[0])!r})")
        raise LoraNameError(self._unknown(name))

    def _field(self, f: LoraFile, field: str) -> str:
        if field == "alias":
            return self.aliases().get(f.path, "")
        return str(getattr(f, field))

    def _subpath(self, path: Path) -> str:
        return next(f.subpath for f in self.files if f.path == path)

    def aliases(self) -> dict[Path, str]:
        """``ss_output_name`` of each safetensors file (read from headers once, on first need)."""
        if self._aliases is None:
            self._aliases = {}
            for f in self.files:
                if f.path.suffix.lower() == ".safetensors":
                    try:
                        alias = read_metadata(f.path).get("ss_output_name", "")
                    except LorakitError:
                        continue
                    if alias:
                        self._aliases[f.path] = alias
        return self._aliases

    def names(self) -> list[str]:
        return sorted({f.subpath for f in self.files} | {f.stem for f in self.files})

    def _unknown(self, name: str) -> str:
        where = ", ".join(str(d) for d in self.dirs) or "(no LoRA folder given: use --lora-dir)"
        close = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        return f"no LoRA named {name!r} in {where}{hint}"
