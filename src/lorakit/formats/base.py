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


# Leaf names of dotted dialects (PEFT, ComfyUI) → kohya/LyCORIS vocabulary.
LEAF_ALIASES = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.default": "dora_scale",
    "lora_magnitude_vector.default.weight": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
}
KOHYA_LEAVES = (
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "oft_blocks", "oft_diag", "rescale",
    "diff", "diff_b", "w_norm", "b_norm", "on_input", "weight",
)
_ALL_LEAVES = sorted(set(KOHYA_LEAVES) | set(LEAF_ALIASES), key=lambda s: -s.count("."))


def split_leaf(key: str) -> tuple[str, str] | None:
    """``a.b.c.lora_A.weight`` → (``a.b.c``, ``lora_down.weight``): the longest known leaf suffix wins."""
    for leaf in _ALL_LEAVES:
        if key.endswith("." + leaf):
            return key[: -len(leaf) - 1], LEAF_ALIASES.get(leaf, leaf)
    return None
