"""User settings: ``lorakit.toml`` in the working folder, else ``~/.config/lorakit/config.toml`` (or the file
named by ``--config``), plus the environment. Keys: ``model`` (path), ``lora_dirs``, ``embedding_dirs`` (lists of
paths), and where models run: ``device`` (auto, cpu, cuda, cuda:N, mps), ``dtype`` (auto, fp16, bf16, fp32),
``vram`` (low, normal, high), ``lora_originals`` (auto, device, host); ``components``: a FLUX.1 diffusers folder
that FLUX.1 single files take their tokenizers (and, transformer-only, text encoders and VAE) from.

Command-line flags win over the environment (``$LORAKIT_DEVICE``, ``$LORAKIT_DTYPE``, ``$LORAKIT_VRAM``,
``$LORAKIT_LORA_ORIGINALS``, ``$LORAKIT_COMPONENTS``), which wins over the file; the file's ``lora_dirs`` and ``$LORAKIT_LORA_DIRS`` are
combined."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LorakitError
from .files.inputs import read_limited
from .library import lora_dirs_from_env

SEARCH = (Path("lorakit.toml"), Path.home() / ".config" / "lorakit" / "config.toml")
MAX_BYTES = 1 << 20  # a settings file is a few lines
DEVICE_KEYS = ("device", "dtype", "vram", "lora_originals", "components")
# The choices, here because this module is torch-free (``models/device.py`` imports them; ``list`` needs no torch).
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
VRAM_MODES = ("low", "normal", "high")
ORIGINALS = ("auto", "device", "host")
CHOICES = {"dtype": DTYPE_CHOICES, "vram": VRAM_MODES, "lora_originals": ORIGINALS}


@dataclass
class Settings:
    model: str | None = None
    lora_dirs: list[Path] = field(default_factory=list)
    embedding_dirs: list[Path] = field(default_factory=list)
    device: str | None = None  # None: not set (``auto``)
    dtype: str | None = None
    vram: str | None = None
    lora_originals: str | None = None
    components: str | None = None  # a FLUX.1 diffusers folder that FLUX single files take what they lack from

    def device_options(self, flags: object = None) -> dict[str, str]:
        """``load_model`` keyword arguments: each of ``flags``' attributes ``device``, ``dtype``, ``vram``,
        ``lora_originals`` (an argparse namespace) wins where it is set; unset ones are left to the defaults."""
        out = {}
        for key in DEVICE_KEYS:
            value = getattr(flags, key, None) or getattr(self, key)
            if value:
                out[key] = str(value)
        return out


def load_settings(path: str | None = None) -> Settings:
    candidates = [Path(path)] if path else [p for p in SEARCH if p.is_file()]
    data: dict[str, object] = {}
    if candidates:
        try:  # a regular file of at most MAX_BYTES (a FIFO would block); ValueError covers TOML and UTF-8 errors
            data = tomllib.loads(read_limited(candidates[0], MAX_BYTES).decode("utf-8"))
        except ValueError as e:
            raise LorakitError(f"{candidates[0]}: unreadable settings file ({str(e)[:200]})") from None
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise LorakitError(f"{candidates[0]}: unreadable settings file (nested too deeply)") from None
    dirs, embedding_dirs = data.get("lora_dirs", []), data.get("embedding_dirs", [])
    if not isinstance(dirs, list) or not isinstance(embedding_dirs, list):
        raise LorakitError(f"{candidates[0]}: lora_dirs and embedding_dirs must be lists of folders")
    model = data.get("model")
    devices = {key: _device_value(key, data, candidates[0] if candidates else None) for key in DEVICE_KEYS}
    return Settings(str(model) if model else None, [Path(str(d)) for d in dirs] + lora_dirs_from_env(),
                    [Path(str(d)) for d in embedding_dirs], **devices)


def _device_value(key: str, data: dict[str, object], source: Path | None) -> str | None:
    """``$LORAKIT_<KEY>`` if set, else the file's value; checked against the choices (the device itself is
    checked when a model is loaded, against the devices this machine has)."""
    env = f"LORAKIT_{key.upper()}"
    raw, where = (os.environ[env], f"${env}") if os.environ.get(env) else (data.get(key), f"{source}: {key}")
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise LorakitError(f"{where} must be a string, got {raw!r}")
    value = raw.strip() if key == "components" else raw.strip().lower()  # a path keeps its case
    if key in CHOICES and value not in CHOICES[key]:
        raise LorakitError(f"{where} must be one of {', '.join(CHOICES[key])}, got {raw!r}")
    return value
