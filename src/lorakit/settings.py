"""User settings: ``lorakit.toml`` in the working folder, else ``~/.config/lorakit/config.toml`` (or the file
named by ``--config``), plus ``$LORAKIT_LORA_DIRS``. Keys: ``model`` (path), ``lora_dirs``, ``embedding_dirs``
(lists of paths).
Command-line flags win over the file; the file's ``lora_dirs`` and the environment's are combined."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LorakitError
from .library import lora_dirs_from_env

SEARCH = (Path("lorakit.toml"), Path.home() / ".config" / "lorakit" / "config.toml")


@dataclass
class Settings:
    model: str | None = None
    lora_dirs: list[Path] = field(default_factory=list)
    embedding_dirs: list[Path] = field(default_factory=list)


def load_settings(path: str | None = None) -> Settings:
    candidates = [Path(path)] if path else [p for p in SEARCH if p.is_file()]
    data: dict[str, object] = {}
    if candidates:
        try:
            data = tomllib.loads(candidates[0].read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise LorakitError(f"{candidates[0]}: unreadable settings file ({e})") from None
    dirs, embedding_dirs = data.get("lora_dirs", []), data.get("embedding_dirs", [])
    if not isinstance(dirs, list) or not isinstance(embedding_dirs, list):
        raise LorakitError(f"{candidates[0]}: lora_dirs and embedding_dirs must be lists of folders")
    model = data.get("model")
    return Settings(str(model) if model else None, [Path(str(d)) for d in dirs] + lora_dirs_from_env(),
                    [Path(str(d)) for d in embedding_dirs])
