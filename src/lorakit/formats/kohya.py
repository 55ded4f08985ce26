"""kohya sd-scripts and LyCORIS: ``lora_unet_<flat path>.<leaf>``, ``lora_te[12]_…``, ``oft_unet_…``,
``lycoris_…``; SDXL UNets in diffusers or LDM/SGM names; bundled embeddings ``bundle_emb.<name>.…``."""
from __future__ import annotations

import torch

from ..keymap import unflatten
from .base import Canonical, component_path, group

PREFIXES = {  # longest first
    "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder",
    "lora_unet_": "unet", "oft_unet_": "unet", "oft_te_": "text_encoder", "lycoris_": None,
}
TE_HEADS = ("text_model", "encoder", "embeddings", "final_layer_norm", "text_projection")


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(k.startswith(tuple(PREFIXES)) and "." in k for k in sd)


def _split(key: str) -> tuple[str, str] | None:
    module, dot, leaf = key.partition(".")
    if not dot:
        return None
    for prefix, component in PREFIXES.items():
        if module.startswith(prefix):
            path = unflatten(module[len(prefix):])
            if component is None:  # LyCORIS' own wrapper: the component is in the path
                component = "text_encoder" if path.split(".", 1)[0] in TE_HEADS else "unet"
            return component_path(component, path), leaf
    return None


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Canonical:
    emb = {k: v for k, v in sd.items() if k.startswith("bundle_emb.")}
    out = group({k: v for k, v in sd.items() if k not in emb}, _split, "kohya")
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
