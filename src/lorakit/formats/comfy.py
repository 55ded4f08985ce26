"""ComfyUI generic: ``diffusion_model.<LDM / BFL path>.<leaf>`` and ``text_encoders.clip_l.transformer.<path>.<leaf>``
(the family names the encoders: ``clip_g`` SDXL's second, ``clip_h`` SD2's, ``t5xxl`` FLUX.1's T5); also
OneTrainer's layouts, ``transformer.<BFL or diffusers path>.<kohya leaf>``, and diffusers module paths with kohya
leaves under the family's PEFT prefixes or none (``transformer_blocks.0.attn.to_k.lora_down.weight`` + ``.alpha``:
Qwen-Image files of OneTrainer and others; no prefix means the denoiser, as in PEFT files)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..keymap.families import SD, Family
from .base import Canonical, component_path, group, split_leaf


_KOHYA_LEAVES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """ComfyUI's prefixes, or dotted module paths with kohya leaves (OneTrainer's
    ``transformer.double_blocks.0.img_attn.qkv.0.lora_down.weight``; a kohya key's module has no dot)."""
    return any(k.startswith(("diffusion_model.", "text_encoders.")) or _dotted_kohya(k) for k in sd)


def _dotted_kohya(key: str) -> bool:
    leaf = next((x for x in _KOHYA_LEAVES if key.endswith(x)), None)
    return leaf is not None and "." in key[:-len(leaf)]


def _splitter(family: Family) -> Callable[[str], tuple[str, str] | None]:
    peft = sorted(family.peft.items(), key=lambda item: -len(item[0]))  # longest first

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
        for prefix, component in peft:
            if module.startswith(prefix):
                return component_path(component, module[len(prefix):]), leaf
        return component_path(family.denoiser, module), leaf
    return split


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical:
    return group(sd, _splitter(family), "comfyui")
