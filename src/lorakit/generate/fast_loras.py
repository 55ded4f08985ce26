"""LCM / Turbo / Hyper LoRAs: recognised from file name, metadata and known file hashes, so their settings can be
applied. No existing tool switches settings for these files; we do: LCM scheduler, CFG 1.5, 6 steps — each only
where the user did not set it explicitly."""
from __future__ import annotations

import re
from pathlib import Path

from ..lora_model import LoraModel

# Whole-file SHA-256 of well-known files → (kind, size in bytes). The official LCM-LoRAs are published as
# "pytorch_lora_weights.safetensors", so people keep them under that name; the hash still tells. Sources: the
# Git-LFS SHA-256 of copies on Hugging Face — two independent copies agree for each LCM-LoRA (fofr/comfyui and
# cleanmists/my for SD1.5; fofr/comfyui and ffxvs/lora-effects-xl for SDXL), one copy (fofr/comfyui) for the rest.
KNOWN_HASHES: dict[str, tuple[str, int | None]] = {
    "8f90d840e075ff588a58e22c6586e2ae9a6f7922996ee6649a7f01072333afe4": ("lcm", 134_621_556),  # lcm-lora-sdv1-5
    "a764e6859b6e04047cd761c08ff0cee96413a8e004c9f07707530cd776b19141": ("lcm", None),  # lcm-lora-sdxl
    "7adaaa69db6f011058a19fd1d5315fdf19ef79fcd513cdab30e173833fd5c59b": ("lcm", None),  # lcm-lora-ssd-1b
    "12f81a27d00a751a40d68fd15597091896c5a90f3bd632fb6c475607cbdad76e": ("hyper", None),  # Hyper-SDXL-4steps
}
SIZE_WINDOW = (100_000_000, 900_000_000)  # only files this large are hashed for the lookup

PATTERNS = {"lcm": re.compile(r"(^|[^a-z])lcm([^a-z]|$)|latent.?consistency"),
            "hyper": re.compile(r"(^|[^a-z])hyper([^a-z]|$)|hyper-?sd"),
            "turbo": re.compile(r"(^|[^a-z])turbo([^a-z]|$)")}
SETTINGS = {"sampler": "LCM", "cfg": 1.5, "steps": 6}


def fast_kind(lora: LoraModel) -> str | None:
    """``"lcm"``, ``"hyper"``, ``"turbo"`` or ``None`` from the file name, the metadata's names, titles and
    descriptions, and finally the file's SHA-256 (cached) for files of a plausible size."""
    return _from_text(lora) or _from_hash(lora)


def _from_hash(lora: LoraModel) -> str | None:
    if not lora.path:
        return None
    size = Path(lora.path).stat().st_size
    sizes = {s for _, s in KNOWN_HASHES.values()}
    if not (SIZE_WINDOW[0] <= size <= SIZE_WINDOW[1] or size in sizes):
        return None
    from ..files.hashes import cached_sha256

    known = KNOWN_HASHES.get(cached_sha256(lora.path))
    return known[0] if known else None


def _from_text(lora: LoraModel) -> str | None:
    meta = lora.metadata
    described = [v for k, v in meta.items() if any(w in k.lower() for w in ("name", "title", "description"))]
    text = " ".join([lora.name, *described]).lower()
    for kind, pattern in PATTERNS.items():
        if pattern.search(text):
            return kind
    return None
