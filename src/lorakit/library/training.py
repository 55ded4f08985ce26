"""Facts users want from a LoRA's metadata, torch-free: trigger words and a brief training summary."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

OPEN, CLOSE = "([{<", ")]}>"

TRAINING_KEYS = {
    "ss_output_name": "output_name", "ss_sd_model_name": "base_model", "ss_base_model_version": "base_version",
    "ss_network_module": "network_module", "ss_network_dim": "network_dim", "ss_network_alpha": "network_alpha",
    "ss_network_args": "network_args", "ss_resolution": "resolution", "ss_num_train_images": "train_images",
    "ss_num_epochs": "epochs", "ss_epoch": "epoch", "ss_steps": "steps", "ss_max_train_steps": "max_steps",
    "ss_learning_rate": "learning_rate", "ss_unet_lr": "unet_lr", "ss_text_encoder_lr": "text_encoder_lr",
    "ss_optimizer": "optimizer", "ss_lr_scheduler": "lr_scheduler", "ss_mixed_precision": "mixed_precision",
    "ss_clip_skip": "clip_skip", "ss_training_comment": "comment", "modelspec.title": "title",
    "modelspec.author": "author", "modelspec.description": "description", "modelspec.architecture": "architecture",
}


def split_phrases(text: str) -> list[str]:
    """A prompt fragment's comma-separated phrases, stripped: A1111's activation text ``"inksketch, monochrome"``
    is two phrases. Commas inside brackets (``(red, blue:1.2)``, ``<lora:x:1>``) do not split."""
    if not any(ch in text for ch in OPEN):  # the common case, at C speed
        return [p.strip() for p in text.split(",") if p.strip()]
    phrases, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in OPEN:
            depth += 1
        elif ch in CLOSE:
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            phrases.append(text[start:i])
            start = i + 1
    phrases.append(text[start:])
    return [p.strip() for p in phrases if p.strip()]


def merge_phrases(sources: Iterable[Iterable[str]]) -> list[str]:
    """Every phrase of every source (each split at commas), in order, each once: a phrase equal to an earlier
    one but for case is left out (the first spelling is kept)."""
    seen: dict[str, str] = {}
    for source in sources:
        for text in source:
            text = str(text)
            for phrase in split_phrases(text) if "," in text else [text.strip()]:  # most tags have no comma
                if phrase:
                    seen.setdefault(phrase.casefold(), phrase)
    return list(seen.values())


def trigger_words(metadata: dict[str, str], top: int = 10) -> list[str]:
    """``modelspec.trigger_phrase``'s phrases first, then the most frequent tags of ``ss_tag_frequency`` (each
    word once, case-blind)."""
    phrases = split_phrases(metadata.get("modelspec.trigger_phrase", ""))
    return merge_phrases([phrases, training_tags(metadata, top + 5)])[:top + len(phrases)]


def training_tags(metadata: dict[str, str], top: int = 10) -> list[str]:
    """The ``top`` most frequent tags of ``ss_tag_frequency`` (kohya's count of each caption's comma-separated
    tags): what the training captions said, not necessarily a trigger."""
    tables = _tag_tables(metadata)
    counts: dict[str, Any] = tables[0] if len(tables) == 1 else Counter()
    for tags in tables if len(tables) > 1 else []:
        try:
            counts.update(tags)  # C speed; tags are normalised by the caller, on the few shown
        except TypeError:
            continue
    try:
        return [str(tag) for tag in sorted(counts, key=counts.__getitem__, reverse=True)[:top]]
    except TypeError:  # counts that are not numbers
        return []


def caption_triggers(metadata: dict[str, str]) -> list[str]:
    """The tags that every training caption of a folder had — trained with every image, so the LoRA answers to
    them: a count equal to the folder's image count (``ss_dataset_dirs``), or, where that is not written, the
    folder's highest count when one tag alone has it. A folder word that captioned no image is not among them."""
    try:
        dirs = json.loads(metadata.get("ss_dataset_dirs", "{}"))
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except (ValueError, RecursionError):
        return []
    if not isinstance(freq, dict):
        return []
    found = []
    for folder, tags in list(freq.items())[:100]:
        counts = {str(t): c for t, c in tags.items() if isinstance(c, int)} if isinstance(tags, dict) else {}
        images = dirs.get(folder, {}).get("img_count") if isinstance(dirs, dict) and isinstance(
            dirs.get(folder), dict) else None
        if not counts:
            continue
        best = max(counts.values())
        if isinstance(images, int) and images > 1:
            found.append([t for t, c in counts.items() if c == images])
        elif images is None and best > 1 and list(counts.values()).count(best) == 1:
            found.append([t for t, c in counts.items() if c == best])
    return merge_phrases(found)


def _tag_tables(metadata: dict[str, str]) -> list[Any]:
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))  # {folder: {tag: count}}
    except (ValueError, RecursionError):  # the C decoder's own depth guard: safe to catch, and no slower scan
        return []
    return [t for t in freq.values() if isinstance(t, dict)] if isinstance(freq, dict) else []


def training_summary(metadata: dict[str, str]) -> dict[str, str]:
    out = {name: metadata[key] for key, name in TRAINING_KEYS.items() if metadata.get(key) not in (None, "", "None")}
    started = metadata.get("ss_training_started_at")
    if started:
        try:
            out["started_at"] = datetime.fromtimestamp(float(started), timezone.utc).isoformat(timespec="seconds")
        except (ValueError, OverflowError):
            pass
    return out
