"""kohya sd-scripts and LyCORIS: ``lora_unet_<flat path>.<leaf>``, ``lora_te[12]_…``, ``oft_unet_…``,
``lycoris_…``; SDXL UNets in diffusers or LDM/SGM names; bundled embeddings ``bundle_emb.<name>.…``."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..keymap.families import FAMILIES, SD, Family
from .base import Canonical, component_path, group

# Every family's prefixes (what ``detect`` looks for); a family's own table says what each one means.
PREFIXES = tuple(sorted({p for f in FAMILIES.values() for p in f.kohya}, key=len, reverse=True))
TE_HEADS = ("text_model", "encoder", "embeddings", "final_layer_norm", "text_projection")


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(k.startswith(PREFIXES) and "." in k for k in sd)


def splitter(family: Family) -> Callable[[str], tuple[str, str] | None]:
    prefixes = sorted(family.kohya.items(), key=lambda item: -len(item[0]))  # longest first

    def split(key: str) -> tuple[str, str] | None:
        module, dot, leaf = key.partition(".")
        if not dot:
            return None
        for prefix, component in prefixes:
            if module.startswith(prefix):
                path = family.vocabulary.unflatten(module[len(prefix):])
                if component is None:  # LyCORIS' own wrapper: the component is in the path
                    component = "text_encoder" if path.split(".", 1)[0] in TE_HEADS else family.denoiser
                return component_path(component, path), leaf
        return None
    return split


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical:
    emb = {k: v for k, v in sd.items() if k.startswith("bundle_emb.")}
    out = group({k: v for k, v in sd.items() if k not in emb}, splitter(family), "kohya")
    out.embeddings = _embeddings(emb)
    if any(k.startswith("lycoris_") for k in sd):
        out.dialect = "lycoris"
    return out


def _embeddings(keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``bundle_emb.<name>.string_to_param.*`` (SD1) or ``bundle_emb.<name>.clip_l``/``clip_g`` (SDXL);
    SDXL pairs are kept under ``<name>.clip_l`` / ``<name>.clip_g``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in keys.items():
        rest = key[len("bundle_emb."):]
        name, _, tail = rest.partition(".")
        out[name if tail.startswith("string_to_param") or not tail else f"{name}.{tail}"] = value
    return out
