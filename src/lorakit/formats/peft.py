"""PEFT / current diffusers: ``unet.…to_q.lora_A.weight`` (= down), ``lora_B`` (= up), optional ``.default.``,
``lora_magnitude_vector`` (DoRA, per output), older ``….lora.down.weight``; α and r from the safetensors header key
``lora_adapter_metadata`` (JSON: ``unet.lora_alpha``, ``unet.r``, ``unet.alpha_pattern``, ``unet.use_rslora``…)."""
from __future__ import annotations

import json
import math

import torch

from ..errors import NotAMatch
from .base import Canonical, component_path, group, split_leaf

_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "lora_magnitude_vector")
_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
             "base_model.model.": "unet"}


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(m in k for k in sd for m in _MARKERS)


def _split(key: str) -> tuple[str, str] | None:
    parts = split_leaf(key)
    if parts is None:
        return None
    module, leaf = parts
    for prefix, component in _PREFIXES.items():
        if module.startswith(prefix):
            return component_path(component, module[len(prefix):]), leaf
    return component_path("unet", module), leaf


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Canonical:
    if not detect(sd, metadata):
        raise NotAMatch
    out = group(sd, _split, "peft")
    for leaves in out.groups.values():
        if "dora_scale" in leaves:  # PEFT's magnitude is per output row, stored (out,) or, for convs, (1, out, 1, 1)
            leaves["dora_scale"] = leaves["dora_scale"].reshape(-1, 1)
    _add_alphas(out, metadata.get("lora_adapter_metadata"))
    return out


def _add_alphas(out: Canonical, raw: str | None) -> None:
    """Turn PEFT's per-component ``lora_alpha`` (+ ``alpha_pattern``, ``use_rslora``) into kohya ``scale`` keys."""
    if not raw:
        return
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return
    for path, leaves in out.groups.items():
        component, _, module = path.partition(".")
        alpha = meta.get(f"{component}.lora_alpha")
        for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        down = leaves.get("lora_down.weight")
        if alpha is None or down is None:
            continue
        r = down.shape[0]
        denom = math.sqrt(r) if meta.get(f"{component}.use_rslora") else r
        leaves["scale"] = torch.tensor(float(alpha) / denom)
