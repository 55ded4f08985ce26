"""LCM / Turbo / Hyper LoRAs: recognised from file name and metadata, so their settings can be applied.

No existing tool switches settings for these files; we do: LCM scheduler, CFG 1.5, 6 steps — each only where the
user did not set it explicitly."""
from __future__ import annotations

import re

from .lora_model import LoraModel

PATTERNS = {"lcm": re.compile(r"(^|[^a-z])lcm([^a-z]|$)|latent.?consistency"),
            "hyper": re.compile(r"(^|[^a-z])hyper([^a-z]|$)|hyper-?sd"),
            "turbo": re.compile(r"(^|[^a-z])turbo([^a-z]|$)")}
SETTINGS = {"sampler": "LCM", "cfg": 1.5, "steps": 6}


def fast_kind(lora: LoraModel) -> str | None:
    """``"lcm"``, ``"hyper"``, ``"turbo"`` or ``None`` from the file name and the metadata's names, titles and
    descriptions. Known file hashes are not used: the official LCM-LoRA files are both published as
    ``pytorch_lora_weights.safetensors`` and their hashes are not available offline — rename them (e.g.
    ``lcm-lora-sdv1-5.safetensors``), as SD.Next also advises."""
    meta = lora.metadata
    described = [v for k, v in meta.items() if any(w in k.lower() for w in ("name", "title", "description"))]
    text = " ".join([lora.name, *described]).lower()
    for kind, pattern in PATTERNS.items():
        if pattern.search(text):
            return kind
    return None
