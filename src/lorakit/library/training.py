"""Facts users want from a LoRA's metadata, torch-free: trigger words and a brief training summary."""
from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any

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


def trigger_words(metadata: dict[str, str], top: int = 10) -> list[str]:
    """``modelspec.trigger_phrase`` first, then the most frequent tags of ``ss_tag_frequency``."""
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        words.append(phrase)
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        freq = {}
    tables = [t for t in freq.values() if isinstance(t, dict)] if isinstance(freq, dict) else []
    counts: dict[str, Any] = tables[0] if len(tables) == 1 else Counter()
    for tags in tables if len(tables) > 1 else []:
        try:
            counts.update(tags)  # type: ignore[attr-defined]  # C speed; tags are normalised below, on the few shown
        except TypeError:
            continue
    try:
        ranked = sorted(counts, key=counts.__getitem__, reverse=True)[:top + 5]
    except TypeError:  # counts that are not numbers
        ranked = []
    for tag in ranked:
        tag = str(tag).strip()
        if tag and tag not in words and len(words) < top + bool(phrase):
            words.append(tag)
    return words


def training_summary(metadata: dict[str, str]) -> dict[str, str]:
    out = {name: metadata[key] for key, name in TRAINING_KEYS.items() if metadata.get(key) not in (None, "", "None")}
    started = metadata.get("ss_training_started_at")
    if started:
        try:
            out["started_at"] = datetime.fromtimestamp(float(started), timezone.utc).isoformat(timespec="seconds")
        except (ValueError, OverflowError):
            pass
    return out
