"""Full-size FLUX.1 transformer configs (``FluxTransformer2DModel`` arguments), shipped so a BFL single file loads
offline without a ``transformer/config.json``: the diffusers defaults (black-forest-labs/FLUX.1-dev and -schnell's
``transformer/config.json``), which differ only in the guidance embedding."""
from __future__ import annotations

from typing import Any

FLUX1: dict[str, Any] = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             axes_dims_rope=[16, 56, 56])
VARIANTS: dict[str, dict[str, Any]] = {
    "flux-1-dev": dict(FLUX1, guidance_embeds=True),
    "flux-1-schnell": dict(FLUX1, guidance_embeds=False),
}


def variant_config(variant: str) -> dict[str, Any]:
    return dict(VARIANTS[variant])
