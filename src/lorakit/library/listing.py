"""What ``lorakit list`` and the HTTP API show of library entries: a stable dict (schema ``lorakit.list/1``), a
text table, and whether a LoRA fits a model (with the reason when it does not)."""
from __future__ import annotations

from typing import Any

from ..keymap.arch import NAMES, Arch
from .library import LoraEntry

SCHEMA = "lorakit.list/1"


def entry_dict(e: LoraEntry) -> dict[str, Any]:
    """Keys: id, name, subpath, alias, path, size_bytes, base, types, rank, alpha, trigger_words,
    explicit_trigger_words, activation_text, negative_text, preferred_weight, notes, description, preview (file name or null), training,
    problems, error (null unless the file could not be read)."""
    side = e.sidecars
    return {
        "id": e.id, "name": e.name, "subpath": e.subpath, "alias": e.alias, "path": str(e.path),
        "size_bytes": e.size, "base": e.base, "types": list(e.info.get("types", [])), "rank": e.info.get("rank"),
        "alpha": e.info.get("alpha"), "trigger_words": e.trigger_words,
        "explicit_trigger_words": e.explicit_trigger_words, "activation_text": side.activation_text,
        "negative_text": side.negative_text, "preferred_weight": side.preferred_weight, "notes": side.notes,
        "description": side.description, "preview": side.preview, "training": e.info.get("training", {}),
        "problems": side.problems, "error": e.info.get("error"),
    }


def incompatibility(lora_base: str, model_arch: str) -> str | None:
    """Why a LoRA made for ``lora_base`` does not fit a ``model_arch`` model, or ``None`` when it may. A LoRA
    whose base is unknown may fit; the demo model (a tiny SD1-architecture network) fits only LoRAs made for it,
    whose shapes match no full-size base."""
    if lora_base == Arch.UNKNOWN or lora_base == model_arch:
        return None
    lora_name = NAMES.get(lora_base, lora_base)
    if lora_base not in NAMES:
        return f"made for {lora_name}, which lorakit does not apply"
    return f"made for {lora_name}; the model is {NAMES.get(model_arch, model_arch)}"


def as_table(entries: list[LoraEntry]) -> str:
    rows = [("NAME", "BASE", "TYPE", "RANK", "SIZE", "TRIGGER WORDS")]
    for e in entries:
        size = f"{e.size / 1e6:.1f} MB"
        rank = str(e.info.get("rank") or "-")
        types = ",".join(e.info.get("types", [])) or ("unreadable" if e.info.get("error") else "-")
        words = ", ".join(e.trigger_words[:5])
        rows.append((e.subpath, e.base, types, rank, size, words[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)
