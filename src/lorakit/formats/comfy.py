"""ComfyUI generic: ``diffusion_model.<LDM path>.<leaf>`` and ``text_encoders.clip_l.transformer.<path>.<leaf>``
(``clip_g`` → SDXL's second encoder; ``clip_h`` → SD2's)."""
from __future__ import annotations

import torch

from .base import Canonical, component_path, group, split_leaf

_TE = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(k.startswith(("diffusion_model.", "text_encoders.")) for k in sd)


def _split(key: str) -> tuple[str, str] | None:
    parts = split_leaf(key)
    if parts is None:
        return None
    module, leaf = parts
    if module.startswith("diffusion_model."):
        return component_path("unet", module[len("diffusion_model."):]), leaf
    if module.startswith("text_encoders."):
        name, _, rest = module[len("text_encoders."):].partition(".")
        rest = rest[len("transformer."):] if rest.startswith("transformer.") else rest
        return (component_path(_TE[name], rest), leaf) if name in _TE else None
    return None


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Canonical:
    return group(sd, _split, "comfyui")
