"""The leaf vocabulary of the canonical form, per network type — the one table the adapters, the dialect readers
and the torch-free library summary share.

A *leaf* is what follows the module path in a kohya/LyCORIS key (``lora_up.weight``, ``hada_w1_a``, ``alpha``…).
Other dialects spell some leaves differently; ``LEAF_ALIASES`` (PEFT, ComfyUI) and ``ATTNPROC_LEAVES`` (diffusers
attention processors) translate them into this vocabulary.
"""
from __future__ import annotations

# Network type → every leaf an adapter of that type consumes (``alpha``/``scale`` where the type reads them).
TYPE_LEAVES: dict[str, tuple[str, ...]] = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_up.bias", "alpha", "scale"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "scale"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "scale"),
    "oft": ("oft_blocks", "oft_diag", "rescale", "alpha"),
    "glora": ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha", "scale"),
    "ia3": ("weight", "on_input"),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
    "set": ("set_weight",),  # ComfyUI / BFL control LoRAs: the weight's new value (replaced, not added)
    "dora": ("dora_scale",),
}
# Network type → the leaves whose presence identifies it. Tried in this order, first match wins (a LoRA layer
# with a ``dora_scale`` is a LoRA wrapped in DoRA, so ``dora`` is no entry here).
TYPE_DETECT: dict[str, tuple[str, ...]] = {
    "lora": ("lora_down.weight", "lora_up.weight"), "loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a"),
    "oft": ("oft_blocks", "oft_diag"), "glora": ("a1.weight",), "ia3": ("on_input",), "full": ("diff",),
    "norm": ("w_norm",), "set": ("set_weight",),
}
# Written by LyCORIS but applied by no tool (LoKr's unused first Tucker core, GLoRA's never-enabled Tucker core):
# known, so dotted dialects still split them off their module path; reported as not understood.
UNUSED_LEAVES = ("lokr_t1", "bm.weight")
# Leaves several types read, which therefore say nothing about the type.
SHARED_LEAVES = ("alpha", "scale", "weight")
# Whole-word leaf names of dotted dialects (PEFT, ComfyUI) → this vocabulary.
LEAF_ALIASES: dict[str, str] = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "lora_B.bias": "lora_up.bias",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.default": "dora_scale",
    "lora_magnitude_vector.default.weight": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
}
# diffusers' legacy attention processors (``…to_q_lora.down.weight``, ``…lora_linear_layer.up.weight``).
ATTNPROC_LEAVES: dict[str, str] = {"down.weight": "lora_down.weight", "up.weight": "lora_up.weight",
                                   "alpha": "alpha"}

KNOWN_LEAVES: tuple[str, ...] = tuple(dict.fromkeys(
    [leaf for leaves in TYPE_LEAVES.values() for leaf in leaves] + list(UNUSED_LEAVES)))
# Leaf (in any spelling above) → the network type it belongs to; shared leaves are left out.
LEAF_TYPE: dict[str, str] = {leaf: kind for kind, leaves in TYPE_LEAVES.items() for leaf in leaves
                             if leaf not in SHARED_LEAVES}
LEAF_TYPE.update({alias: LEAF_TYPE[leaf] for table in (LEAF_ALIASES, ATTNPROC_LEAVES) for alias, leaf in table.items()
                  if leaf in LEAF_TYPE})


def type_of_leaf(leaf: str) -> str | None:
    """The network type ``leaf`` (any spelling) belongs to; ``None`` for shared or unknown leaves."""
    return LEAF_TYPE.get(leaf)
