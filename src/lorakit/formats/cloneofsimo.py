"""cloneofsimo ``lora_diffusion``: ``unet:<i>:up|down``, ``text_encoder:<i>:up|down``; module order is the order in
which ``lora_diffusion`` walked the model for the classes named in metadata (``"unet": '["CrossAttention",
"Attention", "GEGLU"]'``). Files from late 2022 were made when diffusers registered ``attn1, ff, attn2`` in each
transformer block; later ones ``attn1, attn2, ff``: the shape of layer 4 tells which. Token embeddings (metadata
value ``<embed>``) are bundled.

An index is checked against the layers the model has before any table is built (a file naming layer 10⁹ must not
make a 10⁹-entry table): at most 144 UNet linears (16 transformer blocks × 9) and 4 per text-encoder layer of the
deepest CLIP text encoder of SD1/SD2 (OpenCLIP-H, 24 layers).
"""
from __future__ import annotations

import re

import torch

from ..errors import InvalidLora
from ..files.header import loads_bounded
from ..keymap.sd_unet import ATTN_LINEARS, clip_attention_linears, sd1_transformer_blocks
from ..keymap.families import SD, Family
from .base import Canonical

_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down|alpha)$")
MAX_TE_LAYERS = 24
_LEAF = {"up": "lora_up.weight", "down": "lora_down.weight", "alpha": "alpha"}
_PARTNER = {"up": "down", "down": "up"}


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(_KEY.match(k) for k in sd)


def _targets(metadata: dict[str, str], component: str, default: list[str]) -> set[str]:
    try:
        names = loads_bounded(metadata.get(component, "null"))
    except ValueError:
        return set(default)
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) and names else set(default)


def _unet_paths(sd: dict[str, torch.Tensor], targets: set[str]) -> list[str]:
    attn = bool(targets & {"CrossAttention", "Attention", "MemoryEfficientCrossAttention"})
    a1 = [f"attn1.{p}" for p in ATTN_LINEARS] if attn else []
    a2 = [f"attn2.{p}" for p in ATTN_LINEARS] if attn else []
    ff = ["ff.net.0.proj"] if "GEGLU" in targets else []
    old = False
    if attn and ff and "unet:4:up" in sd:  # old order puts GEGLU (out = 8·in) at index 4
        up4, down4 = sd["unet:4:up"], sd["unet:4:down"]  # both present: _check_keys ran first
        if up4.dim() < 2 or down4.dim() < 2:
            raise InvalidLora(None, f"keys 'unet:4:up' {tuple(up4.shape)} and 'unet:4:down' {tuple(down4.shape)} "
                                    "must be matrices")
        old = up4.shape[0] > down4.shape[1]
    per_block = a1 + ff + a2 if old else a1 + a2 + ff
    return [f"{b}.{p}" for b in sd1_transformer_blocks() for p in per_block]


def _check_keys(sd: dict[str, torch.Tensor]) -> int:
    """Every ``up`` has its ``down`` and every index is within the model; returns the text encoder's layer count."""
    limits = {"unet": 16 * 9, "text_encoder": 4 * MAX_TE_LAYERS}
    n_te = 0
    for key in sd:
        m = _KEY.match(key)
        if m is None:
            continue
        component, digits, leaf = m[1], m[2], m[3]
        if len(digits) > 6 or int(digits) >= limits[component]:
            raise InvalidLora(None, f"key {key!r}: index {digits[:12]} beyond the {limits[component]} {component} "
                                    "layers lora_diffusion can target")
        partner = f"{component}:{digits}:{_PARTNER[leaf]}" if leaf in _PARTNER else None
        if partner and partner not in sd:
            raise InvalidLora(None, f"key {key!r} has no partner {partner!r}")
        if component == "text_encoder":
            n_te = max(n_te, int(digits) // 4 + 1)
    return n_te


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical:
    out = Canonical("cloneofsimo")
    n_te = _check_keys(sd)
    tables = {"unet": _unet_paths(sd, _targets(metadata, "unet", ["CrossAttention", "Attention", "GEGLU"])),
              "text_encoder": clip_attention_linears(n_te)}
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
        out.groups.setdefault(f"{component}.{table[index]}", {})[_LEAF[leaf]] = value
    return out
