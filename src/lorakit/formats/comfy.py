"""ComfyUI generic: ``diffusion_model.<LDM / BFL path>.<leaf>`` and ``text_encoders.clip_l.transformer.<path>.<leaf>``
(the family names the encoders: ``clip_g`` SDXL's second, ``clip_h`` SD2's, ``t5xxl`` FLUX.1's T5); also
OneTrainer's BFL layout, ``transformer.<BFL path>.<kohya leaf>``."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..keymap.families import SD, Family
from .base import Canonical, component_path, group, split_leaf


_KOHYA_LEAVES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """ComfyUI's prefixes, or OneTrainer's BFL layout (``transformer.double_blocks.0.img_attn.qkv.0.lora_down``:
    dotted names with kohya leaves)."""
    return any(k.startswith(("diffusion_model.", "text_encoders.")) or k.startswith("transformer.") and
               k.endswith(_KOHYA_LEAVES) for k in sd)


def _splitter(family: Family) -> Callable[[str], tuple[str, str] | None]:
    def split(key: str) -> tuple[str, str] | None:
        parts = split_leaf(key)
        if parts is None:
            return None
        module, leaf = parts
        for prefix in ("diffusion_model.", "transformer."):
            if module.startswith(prefix):
                return component_path(family.denoiser, module[len(prefix):]), leaf
        if module.startswith("text_encoders."):
            name, _, rest = module[len("text_encoders."):].partition(".")
            rest = rest[len("transformer."):] if rest.startswith("transformer.") else rest
            component = family.comfy.get(name)
            return (component_path(component, rest), leaf) if component else None
        return None
    return split


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical:
    return group(sd, _splitter(family), "comfyui")
