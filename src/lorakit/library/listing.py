"""What ``lorakit list`` and the HTTP API show of library entries: a stable dict (schema ``lorakit.list/1``), a
text table, whether a LoRA fits a model (``fit``: yes / maybe / no, with the reason), and A1111's
``/sdapi/v1/loras`` list (only files that load: that API has no place for an error)."""
from __future__ import annotations

from typing import Any

from ..keymap.arch import NAMES, Arch
from ..keymap.families import family_of_arch, fits
from .library import Library, LoraEntry

SCHEMA = "lorakit.list/1"
BASE_NAMES: dict[str, str] = {str(k): v for k, v in NAMES.items()}  # by value: bases travel as plain strings
# FLUX.1 variants (``keymap.detection.variant``): dev and schnell LoRAs are interchangeable on any FLUX.1 model; a
# control or Fill LoRA is trained with a widened input layer (``img_in``: the control image's, or the masked
# image's and the mask's latents beside the noise) and needs a model that has it.
# Words of a FLUX.1 variant → (the model it was made for, what that model's input layer also reads, whether lorakit
# widens a plain FLUX.1 model's input layer for it: control LoRAs, ``patch/expand.py``).
WIDE_INPUT_MODELS = {"fill": ("FLUX.1 Fill", "the masked image", False),
                     "control": ("FLUX.1 Canny or Depth", "the control image", True),
                     "canny": ("FLUX.1 Canny", "the control image", True),
                     "depth": ("FLUX.1 Depth", "the control image", True)}


def entry_dict(e: LoraEntry) -> dict[str, Any]:
    """Keys: id, name, subpath, alias, path, size_bytes, base, types, rank, alpha, trigger_words,
    explicit_trigger_words (the declared phrases, split at commas, each once), trained_trigger_words (those and the
    tags every training caption had: the card's trigger), activation_text, negative_text,
    preferred_weight, notes, description, preview (file name or null), training, problems, error (null unless the
    file cannot be used: truncated, malformed, no LoRA layers), variant (FLUX.1's finer base, else null)."""
    side = e.sidecars
    return {
        "id": e.id, "name": e.name, "subpath": e.subpath, "alias": e.alias, "path": str(e.path),
        "size_bytes": e.size, "base": e.base, "types": list(e.info.get("types", [])), "rank": e.info.get("rank"),
        "alpha": e.info.get("alpha"), "trigger_words": e.trigger_words,
        "explicit_trigger_words": e.explicit_trigger_words, "trained_trigger_words": e.trained_trigger_words,
        "activation_text": side.activation_text,
        "negative_text": side.negative_text, "preferred_weight": side.preferred_weight, "notes": side.notes,
        "description": side.description, "preview": side.preview, "training": e.info.get("training", {}),
        "problems": side.problems, "error": e.error, "variant": e.variant,
    }


def fit(e: LoraEntry, model_arch: str) -> dict[str, Any]:
    """``{"compatible", "fit", "reason"}`` of ``e`` on a ``model_arch`` model: ``fit`` is ``"yes"`` (the base
    matches: ``compatible`` true, no reason), ``"maybe"`` (base unknown, or a FLUX.1 control/Fill LoRA: the
    model's architecture does not say whether its input layer is widened — it may not fit; never shown as
    compatible) or ``"no"`` (another base, or a file that cannot be used)."""
    if e.error:
        return {"compatible": False, "fit": "no", "reason": "the file cannot be used (see its error)"}
    reason = incompatibility(e.base, model_arch, e.variant)
    if reason:
        return {"compatible": False, "fit": "no", "reason": reason}
    if e.base == Arch.UNKNOWN:
        model = BASE_NAMES.get(model_arch, model_arch)
        return {"compatible": False, "fit": "maybe",
                "reason": f"base model unknown (neither its shapes, its metadata nor a sidecar say): it may not fit "
                          f"{model}"}
    if model_arch == Arch.UNKNOWN:
        return {"compatible": False, "fit": "maybe",
                "reason": f"the model's architecture is unknown: a LoRA for {BASE_NAMES.get(e.base, e.base)} may "
                          "not fit it"}
    needs = wide_input_model(e.variant)
    if needs:
        return {"compatible": False, "fit": "maybe", "reason": needs}
    if e.base in family_of_arch(model_arch).fits:  # another family's LoRAs the model's takes (FLUX.1's on Chroma)
        return {"compatible": True, "fit": "yes",
                "reason": f"made for {BASE_NAMES.get(e.base, e.base)}, which {BASE_NAMES.get(model_arch, model_arch)} "
                          "takes: its layers for modules this model lacks are reported, not applied"}
    return {"compatible": True, "fit": "yes", "reason": None}


def wide_input_model(variant: str | None) -> str | None:
    """Why a FLUX.1 control/Fill LoRA may not fit a FLUX.1 model (it needs one whose input layer is widened), or
    ``None`` for any other LoRA."""
    for word, (model, extra, widened) in WIDE_INPUT_MODELS.items():
        if variant and word in variant:
            if widened:
                return (f"made for {model} ({variant}): lorakit widens a FLUX.1 model's input layer for it, and it "
                        f"needs {extra} (--control-image, the API's lorakit_control_image)")
            return (f"made for {model} ({variant}): it needs a {model} model, whose input layer takes {extra} too; "
                    f"it may not fit a plain FLUX.1 model")
    return None


def a1111_loras(library: Library) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras``: ``{name, alias, path, metadata}`` of each LoRA that can be used (a file with an
    ``error`` is left out: A1111 clients would offer it, and it would fail; ``/lorakit/v1/loras`` lists it)."""
    entries = [e for e in library.entries if not e.error]
    return [{"name": e.name, "alias": e.alias or e.name, "path": str(e.path), "metadata": meta}
            for e, meta in zip(entries, library.metadata(entries))]


def incompatibility(lora_base: str, model_arch: str, variant: str | None = None) -> str | None:
    """Why a LoRA made for ``lora_base`` (``variant``: its finer base, named in the reason) does not fit a
    ``model_arch`` model, or ``None`` when it may (the base matches, or is unknown: ``fit`` tells those apart). The
    demo model (a tiny SD1-architecture network) fits only LoRAs made for it (base ``demo``: its widths, 64, match
    no full-size base)."""
    if lora_base not in BASE_NAMES:
        return f"made for {lora_base}, which lorakit does not apply yet"
    if fits(lora_base, model_arch):  # the same base, an unknown one, or one the model's family takes
        return None
    made = BASE_NAMES[lora_base] + (f" ({variant})" if variant else "")
    return f"made for {made}; the model is {BASE_NAMES.get(model_arch, model_arch)}"


def as_table(entries: list[LoraEntry]) -> str:
    """One row per entry (BASE: the variant where the file shows one, ``flux-1-dev``); the errors of files that
    cannot be used follow the table, one line each."""
    rows = [("NAME", "BASE", "TYPE", "RANK", "SIZE", "TRIGGER WORDS")]
    for e in entries:
        size = f"{e.size / 1e6:.1f} MB"
        rank = str(e.info.get("rank") or "-")
        types = "UNREADABLE" if e.error else ",".join(e.info.get("types", [])) or "-"
        words = ", ".join(e.trigger_words[:5])
        rows.append((e.subpath, "-" if e.error else e.variant or e.base, types, rank, size, words[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    return "\n".join(lines + [f"error: {e.error}" for e in entries if e.error])
