"""The canonical form every dialect reader produces, and the grouping helper they share.

``Canonical.groups``: ``{"unet.down_blocks.0.…to_q": {"lora_up.weight": t, "lora_down.weight": t, "alpha": t}}``
— keys are ``<component>.<diffusers module path>`` (component ∈ unet, text_encoder, text_encoder_2; text-encoder
paths without ``text_model.``), leaves use the kohya/LyCORIS vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..keymap import canonical_te_path, is_ldm_path, ldm_to_diffusers
from ..keymap.leaves import KNOWN_LEAVES, LEAF_ALIASES

Grouped = dict[str, dict[str, torch.Tensor]]


@dataclass
class Canonical:
    dialect: str
    groups: Grouped = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)  # keys of the file nobody understood


def group(sd: dict[str, torch.Tensor], split: Callable[[str], tuple[str, str] | None], dialect: str) -> Canonical:
    """Group a state dict by ``split(key) -> (canonical module path, leaf)``; ``None`` marks a leftover."""
    out = Canonical(dialect)
    for key, value in sd.items():
        parts = split(key)
        if parts is None:
            out.leftovers.append(key)
            continue
        path, leaf = parts
        out.groups.setdefault(path, {})[leaf] = value
    return out


def component_path(component: str, path: str) -> str:
    """Normalise a module path inside ``component``: LDM UNet names → diffusers names, TE without
    ``text_model.``. Returns ``component.path``."""
    if component == "unet" and is_ldm_path(path):
        path = ldm_to_diffusers(path) or f"?ldm.{path}"  # unknown LDM names stay visible and unmatched
    elif component.startswith("text_encoder"):
        path = canonical_te_path(path)
    return f"{component}.{path}"


# Every leaf spelling a dotted dialect (PEFT, ComfyUI) may end a key with, the longest (most dots) first.
_ALL_LEAVES = sorted(set(KNOWN_LEAVES) | set(LEAF_ALIASES), key=lambda s: -s.count("."))


def split_leaf(key: str) -> tuple[str, str] | None:
    """``a.b.c.lora_A.weight`` → (``a.b.c``, ``lora_down.weight``): the longest known leaf suffix wins."""
    for leaf in _ALL_LEAVES:
        if key.endswith("." + leaf):
            return key[: -len(leaf) - 1], LEAF_ALIASES.get(leaf, leaf)
    return None
