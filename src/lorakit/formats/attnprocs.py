"""diffusers' own pre-PEFT LoRA files: legacy attention processors ``[unet.]…attn1.processor.to_q_lora.down.weight``,
text encoders ``text_encoder.…q_proj.lora_linear_layer.up.weight``, and the ``LoRACompatibleLinear``/``Conv`` layout
of diffusers 0.21–0.24 ``unet.…to_q.lora.down.weight`` (``.lora.up.weight``)."""
from __future__ import annotations

import torch

from ..keymap.leaves import ATTNPROC_LEAVES
from ..keymap.families import SD, Family
from .base import Canonical, component_path, group

_PROC = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_LEAF = ATTNPROC_LEAVES
_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.")


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(".processor." in k or ".lora_linear_layer." in k or k.endswith(_COMPAT) for k in sd)


_COMPAT = (".lora.down.weight", ".lora.up.weight")


def _component(key: str) -> tuple[str, str]:
    for c in _COMPONENTS:
        if key.startswith(c):
            return c[:-1], key[len(c):]
    return "unet", key


def _split(key: str) -> tuple[str, str] | None:
    component, rest = _component(key)
    if ".processor." in rest:
        module, _, tail = rest.partition(".processor.")
        proc, _, leaf = tail.partition(".")
        if proc in _PROC and leaf in _LEAF:
            return component_path(component, f"{module}.{_PROC[proc]}"), _LEAF[leaf]
        return None
    if ".lora_linear_layer." in rest:
        module, _, leaf = rest.partition(".lora_linear_layer.")
        return (component_path(component, module), _LEAF[leaf]) if leaf in _LEAF else None
    if rest.endswith(_COMPAT):
        module, _, leaf = rest.rpartition(".lora.")
        return component_path(component, module), _LEAF[leaf]
    return None


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical:
    return group(sd, _split, "diffusers-attnprocs")
