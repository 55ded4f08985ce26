"""Files beside a LoRA that users and other tools rely on (same folder, same stem):

- previews: ``NAME.png``, ``NAME.preview.png`` (also ``.jpg``, ``.jpeg``, ``.webp``, ``.gif``), as A1111 finds them;
- ``NAME.civitai.info``: Civitai's JSON (``trainedWords``, ``baseModel``, ``description``);
- ``NAME.json``: A1111's user metadata (``activation text``, ``preferred weight``, ``negative text``,
  ``sd version``, ``notes``, ``description``).

Broken sidecars are ignored (with the reason kept), never fatal: they are the user's notes, not the LoRA.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..files.inputs import read_json
from ..keymap.arch import Arch

PREVIEW_EXTS = ("png", "jpg", "jpeg", "webp", "gif")
# Civitai "baseModel" (``SD 1.5``, ``SD 1.5 LCM``, ``SD 2.1 768``, ``SDXL 1.0``, ``Pony``, ``Flux.1 D``, ``SD 3.5``,
# ``Hunyuan 1``, …) / A1111 "sd version" (``SD1``, ``SD2``, ``SDXL``, ``Unknown``) → lorakit base names. Matched
# from the start of the name: other families' names hold version numbers too ("Flux.1", "Hunyuan 1").
BASE_WORDS = [(re.compile(r"^(?:sdxl|sd\s*xl|pony|illustrious|noobai|playground\s*v2)", re.I), Arch.SDXL),
              (re.compile(r"^(?:sd|stable\s*diffusion)\s*(?:v\s*)?2(?:\.\d+)?(?!\d)", re.I), Arch.SD2),
              (re.compile(r"^(?:sd|stable\s*diffusion)\s*(?:v\s*)?1(?:\.\d+)?(?!\d)", re.I), Arch.SD1),
              (re.compile(r"^flux\.?\s*2", re.I), "FLUX.2"),
              (re.compile(r"^flux", re.I), Arch.FLUX1),
              (re.compile(r"^chroma", re.I), Arch.CHROMA),
              (re.compile(r"^qwen", re.I), Arch.QWEN_IMAGE),
              (re.compile(r"^(?:sd|stable\s*diffusion)\s*3", re.I), "Stable Diffusion 3")]


@dataclass
class Sidecars:
    preview: str | None = None  # file name beside the LoRA
    activation_text: str = ""
    negative_text: str = ""
    preferred_weight: float | None = None
    sd_version: str | None = None  # sd1 / sd2 / sdxl / a foreign family, from NAME.json or the Civitai baseModel
    notes: str = ""
    description: str = ""
    trained_words: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sidecar_names(stem: str) -> list[str]:
    """Every sidecar name a LoRA called ``stem`` may have, in order of preference."""
    previews = [f"{stem}{mid}.{ext}" for ext in PREVIEW_EXTS for mid in ("", ".preview")]
    return previews + [f"{stem}.civitai.info", f"{stem}.json"]


SIDECAR_SUFFIXES = tuple(f"{mid}.{ext}" for ext in PREVIEW_EXTS for mid in (".preview", "")) + (".civitai.info",
                                                                                               ".json")


def sidecars_by_stem(names: Iterable[str]) -> dict[str, list[str]]:
    """Sidecar file names of one folder grouped by the LoRA stem they belong to."""
    out: dict[str, list[str]] = {}
    for name in names:
        for suffix in SIDECAR_SUFFIXES:
            if name.endswith(suffix):
                out.setdefault(name[: -len(suffix)], []).append(name)
                break
    return out


def read_sidecars(folder: Path, stem: str, present: set[str]) -> Sidecars:
    """``present``: the sidecar names that exist (from the directory listing; no extra stat calls)."""
    out = Sidecars()
    if not present:
        return out
    out.preview = next((n for n in sidecar_names(stem)[:-2] if n in present), None)
    if f"{stem}.civitai.info" in present:
        _civitai(out, _json(folder / f"{stem}.civitai.info", out))
    if f"{stem}.json" in present:
        _user_metadata(out, _json(folder / f"{stem}.json", out))
    return out


def _json(path: Path, out: Sidecars) -> dict[str, Any]:
    try:
        obj = read_json(path)
    except ValueError as e:  # not a regular file, too big, not UTF-8, not JSON, nested too deep
        out.problems.append(f"{path.name}: unreadable ({str(e)[:200]})")
        return {}
    if not isinstance(obj, dict):
        out.problems.append(f"{path.name}: not a JSON object")
        return {}
    return obj


def _civitai(out: Sidecars, info: dict[str, Any]) -> None:
    words = info.get("trainedWords") or []
    out.trained_words = [str(w).strip() for w in words if str(w).strip()] if isinstance(words, list) else []
    out.sd_version = out.sd_version or base_from_words(str(info.get("baseModel", "")))
    if not out.description and isinstance(info.get("description"), str):
        out.description = re.sub(r"<[^>]+>", " ", info["description"]).strip()


def _user_metadata(out: Sidecars, meta: dict[str, Any]) -> None:
    out.activation_text = str(meta.get("activation text", "") or "").strip()
    out.negative_text = str(meta.get("negative text", "") or "").strip()
    out.notes = str(meta.get("notes", "") or "")
    out.description = str(meta.get("description", "") or "") or out.description
    try:
        weight = float(meta.get("preferred weight", 0) or 0)
    except (TypeError, ValueError):
        weight = 0.0
    out.preferred_weight = weight or None  # A1111: 0 means "the default weight"
    version = base_from_words(str(meta.get("sd version", "") or ""))
    out.sd_version = version or out.sd_version


def base_from_words(text: str) -> str | None:
    """``SD 1.5`` → sd1, ``SDXL 1.0`` / ``Pony`` → sdxl, ``SD 2.1`` → sd2, ``Flux.1 D`` → flux1, ``SD 3.5`` →
    Stable Diffusion 3; other names (``Other``, ``Unknown``, families lorakit does not know) → ``None``.

    A sidecar only fills in a base the file's shapes leave unknown (``LoraEntry.base``): it is the user's or
    Civitai's word, and is often wrong for the file beside it."""
    for pattern, base in BASE_WORDS:
        if pattern.search(text.strip()):
            return base
    return None
