"""What ``lorakit inspect`` reports: a LoRA file's facts as a plain dict (the ``--json`` schema) and as text.

Schema ``lorakit.inspect/1`` — keys: schema, file, name, size_bytes, dialect, architecture, network_types, rank,
ranks, alpha, alphas, layers, modules (per component), embeddings [{name, shape}], unrecognised_keys,
trigger_words (the declared trigger phrase, then the training captions' commonest tags), trained_trigger_words (only
words that were trained: ``modelspec.trigger_phrase`` and the tags every caption had), training_tags,
hashes {sha256, autov2, addnet, a1111_short, sshs_model_hash, sshs_matches}, training {…}.
A file that cannot be read is ``{schema, file, error}`` in a list of several (``failure``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import LorakitError
from .files.hashes import cached_hashes
from .keymap.arch import NAMES
from .library.training import caption_triggers, merge_phrases, split_phrases, training_summary, training_tags, \
    trigger_words
from .lora_model import LoraModel, load_lora

SCHEMA = "lorakit.inspect/1"


def describe(path: str | Path, lora: LoraModel | None = None) -> dict[str, Any]:
    lora = lora or load_lora(path)
    p = Path(path)
    return {
        "schema": SCHEMA, "file": str(p), "name": lora.name, "size_bytes": p.stat().st_size,
        "dialect": lora.dialect, "architecture": lora.arch, "network_types": lora.network_types,
        "rank": lora.rank, "ranks": lora.ranks, "alpha": lora.alpha, "alphas": lora.alphas,
        "layers": len(lora.layers), "modules": lora.modules_per_component(),
        "embeddings": [{"name": k, "shape": list(v.shape)} for k, v in lora.embeddings.items()],
        "unrecognised_keys": lora.leftovers, "trigger_words": trigger_words(lora.metadata),
        "trained_trigger_words": merge_phrases([split_phrases(lora.metadata.get("modelspec.trigger_phrase", "")),
                                                caption_triggers(lora.metadata)]),
        "training_tags": training_tags(lora.metadata, 5),
        "hashes": cached_hashes(p, lora.metadata).as_dict(), "training": training_summary(lora.metadata),
    }


def failure(path: str | Path, error: LorakitError) -> dict[str, Any]:
    """The entry of a file that could not be inspected."""
    return {"schema": SCHEMA, "file": str(path), "error": str(error)}


def as_text(info: dict[str, Any]) -> str:
    h = info["hashes"]
    mods = ", ".join(f"{k} {v}" for k, v in sorted(info["modules"].items()))
    lines = [
        f"{info['name']}  ({info['file']}, {info['size_bytes'] / 1e6:.1f} MB)",
        f"  format        {info['dialect']}",
        f"  architecture  {NAMES.get(info['architecture'], info['architecture'])}",
        f"  type          {', '.join(info['network_types'])}",
        f"  rank / alpha  {_list(info['ranks'])} / {_list(info['alphas'])}",
        f"  modules       {mods}  ({info['layers']} layers)",
    ]
    if info["embeddings"]:
        lines.append("  embeddings    " + ", ".join(f"{e['name']} {tuple(e['shape'])}" for e in info["embeddings"]))
    if info["unrecognised_keys"]:
        lines.append(f"  not understood {len(info['unrecognised_keys'])} keys, e.g. {info['unrecognised_keys'][0]}")
    lines.append(f"  trigger words {', '.join(info['trained_trigger_words']) or '(none trained)'}")
    tags = [t for t in info["training_tags"] if t not in info["trained_trigger_words"]]
    if tags:
        lines.append(f"  caption tags  {_clipped(' · '.join(tags))}")
    lines.append(f"  hashes        AutoV2 {h['autov2']}  A1111 short {h['a1111_short']}  sha256 {h['sha256']}")
    if h["sshs_model_hash"] is not None:
        note = "matches" if h["sshs_matches"] else f"differs from the computed {h['addnet']}"
        lines.append(f"                sshs_model_hash {h['sshs_model_hash']} ({note})")
    for k, v in info["training"].items():
        lines.append(f"  {k:<13} {_clipped(v)}")
    return "\n".join(lines)


def _clipped(text: str) -> str:
    return text if len(text) < 100 else text[:97] + "..."


def _list(values: list[Any]) -> str:
    if not values:
        return "-"
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:6]) + (" …" if len(values) > 6
                                                                                           else "")
