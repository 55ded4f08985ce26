"""What ``lorakit inspect`` reports: a LoRA file's facts as a plain dict (the ``--json`` schema) and as text.

Schema ``lorakit.inspect/1`` — keys: schema, file, name, size_bytes, dialect, architecture, network_types, rank,
ranks, alpha, alphas, layers, modules (per component), embeddings [{name, shape}], unrecognised_keys,
trigger_words (the declared trigger phrase, then the training captions' commonest tags), trained_trigger_words (only
words that were trained: ``modelspec.trigger_phrase`` and the tags every caption had), training_tags,
hashes {sha256, autov2, addnet, a1111_short, sshs_model_hash, sshs_matches}, training {…}; added
since (old keys unchanged): family, base, variant, supported, note, encoders {component: name}, layout,
fused_layers [{layer, count, into, halves_swapped}], tensors.
A file that cannot be read is ``{schema, file, error}`` in a list of several (``failure``). A file for a family
lorakit does not apply (Chroma, FLUX.2, …) is described from its header (``supported`` false, ``note`` says so).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import LorakitError
from .files.hashes import cached_hashes
from .files.header import read_header
from .files.io import StateDict, load_file
from .formats import to_canonical
from .keymap import detection, families
from .keymap.arch import NAMES
from .keymap.flux import Fused
from .library.summary import summarise
from .library.training import caption_triggers, merge_phrases, split_phrases, training_summary, training_tags, \
    trigger_words
from .lora_model import LoraModel, lora_from_state_dict

SCHEMA = "lorakit.inspect/1"
BLOCK_INDEX = re.compile(r"(?<=_blocks)\.\d+(?=\.)")  # double_blocks.7.img_attn.qkv → double_blocks.*.img_attn.qkv
MODEL_BLOCK = re.compile(r"^(?:single_)?transformer_blocks\.\d+\.")


def describe(path: str | Path, lora: LoraModel | None = None, *, strict: bool = False) -> dict[str, Any]:
    """The report of one file (``lora``: the file already loaded). A file for a family lorakit does not apply is
    reported too, from its header (``supported`` false), never loaded."""
    p = Path(path)
    if lora is not None:
        own = _family(lora)
        return _report(p, lora, layout(*load_file(p), own) if own.to_model is not None else (None, []))
    if p.suffix.lower() == ".safetensors":  # a foreign file's tensors (often GBs) are never read
        header = read_header(p)
        found = detection.detect(list(header.tensors), header.metadata, header.tensors)
        if isinstance(found, str):
            return _foreign(p, found, header.metadata, len(header.tensors))
    sd, metadata = load_file(p)
    family = detection.detect(list(sd), metadata, sd)
    if isinstance(family, str):
        return _foreign(p, family, metadata, len(sd))
    lora = lora_from_state_dict(sd, metadata, name=p.stem, path=str(p), strict=strict)
    return _report(p, lora, layout(sd, metadata, family))


def _family(lora: LoraModel) -> families.Family:
    return families.family_of_arch(lora.arch)  # SD3's sizes are its family's too


def _report(p: Path, lora: LoraModel, names: tuple[str | None, list[dict[str, Any]]]) -> dict[str, Any]:
    family = _family(lora)
    modules = lora.modules_per_component()
    return {
        "schema": SCHEMA, "file": str(p), "name": lora.name, "size_bytes": p.stat().st_size,
        "dialect": lora.dialect, "architecture": lora.arch, "network_types": lora.network_types,
        "rank": lora.rank, "ranks": lora.ranks, "alpha": lora.alpha, "alphas": lora.alphas,
        "layers": len(lora.layers), "modules": modules,
        "embeddings": [{"name": k, "shape": list(v.shape)} for k, v in lora.embeddings.items()],
        "unrecognised_keys": lora.leftovers, "trigger_words": trigger_words(lora.metadata), **_trained(lora.metadata),
        "hashes": cached_hashes(p, lora.metadata).as_dict(), "training": training_summary(lora.metadata),
        "family": family.display, "base": lora.base, "variant": lora.variant, "supported": True, "note": None,
        "encoders": {k: v for k, v in family.encoders.items() if k in modules}, "layout": names[0],
        "fused_layers": names[1], "tensors": None,
    }


def layout(sd: StateDict, metadata: dict[str, str], family: families.Family) -> tuple[str | None,
                                                                                   list[dict[str, Any]]]:
    """How a family with an original layout (FLUX.1) names the file's layers — ``"bfl"`` (the original names,
    mapped onto the model's) or ``"diffusers"`` (the model's own); ``None`` for Stable Diffusion — and its fused
    original layers (BFL's ``qkv``, ``linear1``, final adaLN) with the model modules each was split into, one entry
    per layer name with the block index left out."""
    canonical = to_canonical(sd, metadata, family)
    if canonical is None or family.to_model is None:
        return None, []
    original = [inner for module in canonical.groups if (parts := module.partition("."))[0] == family.denoiser
                and family.is_original(inner := parts[2])]
    found: Counter[str] = Counter()
    targets: dict[str, Fused] = {}
    for inner in original:
        if isinstance(target := family.to_model(inner), Fused):
            layer = BLOCK_INDEX.sub(".*", inner)
            found[layer] += 1
            targets[layer] = target
    fused = [{"layer": layer, "count": n, "into": [MODEL_BLOCK.sub("", t) for t in targets[layer].targets],
              "halves_swapped": targets[layer].swap} for layer, n in found.items()]
    return ("bfl" if original else "diffusers"), fused


def _trained(metadata: dict[str, str]) -> dict[str, list[str]]:
    """The words that were trained (the declared trigger phrase, the tags every caption had) and the other tags."""
    return {"trained_trigger_words": merge_phrases([split_phrases(metadata.get("modelspec.trigger_phrase", "")),
                                                    caption_triggers(metadata)]),
            "training_tags": training_tags(metadata, 5)}


def _foreign(p: Path, family: str, metadata: dict[str, str], tensors: int) -> dict[str, Any]:
    """A file for a family lorakit does not apply: what its header shows (as ``lorakit list``), and that."""
    s = summarise(p)
    return {
        "schema": SCHEMA, "file": str(p), "name": p.stem, "size_bytes": p.stat().st_size, "dialect": None,
        "architecture": family, "network_types": s.types, "rank": s.rank, "ranks": [s.rank] if s.rank else [],
        "alpha": s.alpha, "alphas": [s.alpha] if s.alpha is not None else [], "layers": 0, "modules": {},
        "embeddings": [], "unrecognised_keys": [], "trigger_words": trigger_words(metadata), **_trained(metadata),
        "hashes": cached_hashes(p, metadata).as_dict(), "training": training_summary(metadata),
        "family": family, "base": family, "variant": None, "supported": False,
        "note": f"lorakit does not apply {family} LoRAs yet (it applies {families.SUPPORTED})",
        "encoders": {}, "layout": None, "fused_layers": [], "tensors": tensors,
    }


def failure(path: str | Path, error: LorakitError) -> dict[str, Any]:
    """The entry of a file that could not be inspected."""
    return {"schema": SCHEMA, "file": str(path), "error": str(error)}


def as_text(info: dict[str, Any]) -> str:
    lines = [f"{info['name']}  ({info['file']}, {info['size_bytes'] / 1e6:.1f} MB)"]
    if not info.get("supported", True):
        lines += [f"  family        {info['family']}",
                  f"  applied       no: {info['note']}",
                  f"  type          {', '.join(info['network_types']) or '-'}",
                  f"  rank / alpha  {_list(info['ranks'])} / {_list(info['alphas'])}",
                  f"  tensors       {info['tensors']}"]
    else:
        lines += _applied_lines(info)
    h = info["hashes"]
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


def _applied_lines(info: dict[str, Any]) -> list[str]:
    named = info.get("encoders", {}) if info.get("layout") else {}  # DiT families: text_encoder_2 is T5, say so
    mods = ", ".join(f"{k}{f' ({named[k]})' if k in named else ''} {v}" for k, v in sorted(info["modules"].items()))
    variant = f" ({info['variant']})" if info.get("variant") else ""
    lines = [
        f"  format        {info['dialect']}",
        f"  architecture  {NAMES.get(info['architecture'], info['architecture'])}{variant}",
        f"  type          {', '.join(info['network_types'])}",
        f"  rank / alpha  {_list(info['ranks'])} / {_list(info['alphas'])}",
        f"  modules       {mods}  ({info['layers']} layers)",
    ]
    lines += _layout_lines(info)
    if info["embeddings"]:
        lines.append("  embeddings    " + ", ".join(f"{e['name']} {tuple(e['shape'])}" for e in info["embeddings"]))
    if info["unrecognised_keys"]:
        lines.append(f"  not understood {len(info['unrecognised_keys'])} keys, e.g. {info['unrecognised_keys'][0]}")
    return lines


def _layout_lines(info: dict[str, Any]) -> list[str]:
    if info.get("layout") == "diffusers":
        return ["  layout        diffusers names (the model's own): nothing to split"]
    if info.get("layout") != "bfl":
        return []
    fused = info.get("fused_layers", [])
    head = "  layout        BFL names, mapped onto diffusers' modules" + ("; fused layers split exactly:" if fused
                                                                           else " (no fused layer in the file)")
    return [head] + [f"                  {f['layer']}{f' ×{n}' if (n := f['count']) > 1 else ''} → "
                     f"{', '.join(f['into'])}{', halves swapped (BFL shift|scale)' if f['halves_swapped'] else ''}"
                     for f in fused]


def _list(values: list[Any]) -> str:
    if not values:
        return "-"
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:6]) + (" …" if len(values) > 6
                                                                                           else "")
