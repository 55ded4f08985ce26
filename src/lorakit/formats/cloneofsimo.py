"""cloneofsimo ``lora_diffusion``: ``unet:<i>:up|down``, ``text_encoder:<i>:up|down``; module order is the order in
which ``lora_diffusion`` walked the model for the classes named in metadata (``"unet": '["CrossAttention",
"Attention", "GEGLU"]'``). Files from late 2022 were made when diffusers registered ``attn1, ff, attn2`` in each
transformer block; later ones ``attn1, attn2, ff``: the shape of layer 4 tells which. Token embeddings (metadata
value ``<embed>``) are bundled."""
from __future__ import annotations

import json
import re

import torch

from ..errors import InvalidLora, NotAMatch
from ..keymap.sd_unet import (
    ATTN_LINEARS,
    clip_attention_linears,
    sd1_transformer_blocks,
)
from .base import Canonical

_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down|alpha)$")


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(_KEY.match(k) for k in sd)


def _targets(metadata: dict[str, str], component: str, default: list[str]) -> set[str]:
    try:
        return set(json.loads(metadata.get(component, "null")) or default)
    except (json.JSONDecodeError, TypeError):
        return set(default)


def _unet_paths(sd: dict[str, torch.Tensor], targets: set[str]) -> list[str]:
    attn = bool(targets & {"CrossAttention", "Attention", "MemoryEfficientCrossAttention"})
    a1 = [f"attn1.{p}" for p in ATTN_LINEARS] if attn else []
    a2 = [f"attn2.{p}" for p in ATTN_LINEARS] if attn else []
    ff = ["ff.net.0.proj"] if "GEGLU" in targets else []
    old = False
    if attn and ff and "unet:4:up" in sd:  # old order puts GEGLU (out = 8·in) at index 4
        up4, down4 = sd["unet:4:up"], sd["unet:4:down"]
        old = up4.shape[0] > down4.shape[1]
    per_block = a1 + ff + a2 if old else a1 + a2 + ff
    return [f"{b}.{p}" for b in sd1_transformer_blocks() for p in per_block]


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Canonical:
    if not detect(sd, metadata):
        raise NotAMatch
    out = Canonical("cloneofsimo")
    n_te = 1 + max((int(m[2]) for k in sd if (m := _KEY.match(k)) and m[1] == "text_encoder"), default=-1)
    tables = {"unet": _unet_paths(sd, _targets(metadata, "unet", ["CrossAttention", "Attention", "GEGLU"])),
              "text_encoder": clip_attention_linears((n_te + 3) // 4)}
    for key, value in sd.items():
        m = _KEY.match(key)
        if m is None:
            if metadata.get(key) == "<embed>":
                out.embeddings[key] = value
            else:
                out.leftovers.append(key)
            continue
        component, index, leaf = m[1], int(m[2]), m[3]
        table = tables[component]
        if index >= len(table):
            raise InvalidLora(None, f"key {key!r}: index {index} beyond the {len(table)} {component} layers "
                                    f"lora_diffusion targets")
        name = {"up": "lora_up.weight", "down": "lora_down.weight", "alpha": "alpha"}[leaf]
        out.groups.setdefault(f"{component}.{table[index]}", {})[name] = value
    return out
