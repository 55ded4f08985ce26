"""XLabs (x-flux) FLUX.1 LoRAs: ``double_blocks.<i>.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (1 = image
stream, 2 = text stream) and ``single_blocks.<i>.processor.{qkv,proj}_lora.…`` — attention processors on the BFL
layout, no α (scale 1). The single blocks' ``qkv_lora`` covers the q, k, v rows of ``linear1`` only (its MLP rows
are untouched), named ``linear1_qkv`` here as ComfyUI does."""
from __future__ import annotations

import re

import torch

from ..errors import NotAMatch
from ..keymap.families import SD, Family
from ..keymap.leaves import ATTNPROC_LEAVES
from .base import Canonical, component_path, group

_KEY = re.compile(r"(?:diffusion_model\.|transformer\.)?(double|single)_blocks\.(\d+)\.processor\."
                  r"(qkv|proj)_lora(1|2)?\.(down\.weight|up\.weight|alpha)")
_MODULES = {("double", "qkv", "1"): "img_attn.qkv", ("double", "qkv", "2"): "txt_attn.qkv",
            ("double", "proj", "1"): "img_attn.proj", ("double", "proj", "2"): "txt_attn.proj",
            ("single", "qkv", None): "linear1_qkv", ("single", "proj", None): "linear2"}


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in sd)


def _split(family: Family, key: str) -> tuple[str, str] | None:
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    module = _MODULES.get((m[1], m[3], m[4]))
    if module is None:
        return None
    return component_path(family.denoiser, f"{m[1]}_blocks.{m[2]}.{module}"), ATTNPROC_LEAVES[m[5]]


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical:
    if family.to_model is None:  # processor keys of another family (diffusers' legacy SD processors)
        raise NotAMatch()
    return group(sd, lambda key: _split(family, key), "xlabs")
