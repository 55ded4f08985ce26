"""The base model a LoRA file was made for, from its parsed header's shapes alone (no torch, no tensor data).

Used when a header's two ends do not tell (``summary``): every entry is looked at. A layer's input width is read
from the factor that multiplies the layer's input — ``lora_down``/``lora_A``/``down`` ``(r, in[, k, k])``, LoHa
``hada_w1_b`` ``(r, in)``, a full ``diff`` ``(out, in[, k, k])``, GLoRA ``a1`` ``(r, in)``, and LoKr's two factors,
``in = in(w1) · in(w2)`` — and the widths that only one base has decide:

- cross-attention keys/values (``attn2.to_k``/``to_v``) take the text width: 768 SD1, 1024 SD2, 2048 SDXL, 64 the
  demo model;
- text-encoder layers take 768 / 3072 (CLIP-L: SD1, SDXL's first), 1024 / 4096 (OpenCLIP-H: SD2), 1280 / 5120
  (OpenCLIP-G: SDXL's second), 64 / 128 (the demo model's);
- a UNet layer of any name (cloneofsimo numbers its layers) with input 2048, 1024 or 768 can only be a
  cross-attention projection of SDXL, SD2 or SD1: their UNets' other widths are 320·2ᵏ and multiples of 320.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

from ..keymap.arch import CONTEXT_WIDTH, CROSS_DIM, TEXT_WIDTH, Arch

COMPONENTS = (("unet", ("unet", "input_blocks", "down_blocks", "mid_block", "up_blocks", "output_blocks")),
              ("te", ("lora_te_", "lora_te1_", "text_encoder.", "text_encoder:", "te1.")),
              ("te2", ("lora_te2_", "text_encoder_2.", "te2.")))
# A DiT family's files (FLUX.1, and those lorakit names but does not apply): the transformer, CLIP-L (``te``) and
# T5 (``t5``; kohya's ``lora_te3_``, OneTrainer's ``lora_te2_``, ComfyUI's ``t5xxl``) — checked in this order.
DIT_COMPONENTS = (("t5", ("lora_te3_", "lora_te2_", "text_encoder_2.", "t5xxl")),
                  ("te", ("lora_te1_", "lora_te_", "text_encoder.", "clip_l")))
DIT_ORDER = ("transformer", "te", "t5")
UNET_CONTEXT_ONLY = CROSS_DIM
# Leaves whose second dimension is the layer's input width.
INPUT_LEAVES = re.compile(r"(?:^|[._:])(?:lora_down|lora_A|down|hada_w1_b|hada_w2_b|diff|a1)(?:\.default)?"
                          r"(?:\.weight)?$")
LOKR = re.compile(r"^(.*)[._](lokr_w[12](?:_b)?)$")
CROSS = re.compile(r"attn2[._](?:processor[._])?to_[kv]")


class Shaped(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


def component(key: str) -> str | None:
    """``unet``, ``te`` or ``te2`` from the key's name; ``None`` when the name does not say."""
    for name, marks in reversed(COMPONENTS):  # te2 before te: "lora_te2_" also contains "lora_te"
        if any(m in key for m in marks):
            return name
    return None


def dit_component(key: str) -> str:
    """``t5``, ``te`` or ``transformer`` (every other key) of a DiT family's key."""
    return next((name for name, marks in DIT_COMPONENTS if any(m in key for m in marks)), "transformer")


def dit_components(keys: list[str]) -> list[str]:
    """The components ``keys`` show, in ``DIT_ORDER``."""
    found = {dit_component(k) for k in keys}
    return [c for c in DIT_ORDER if c in found]


def input_widths(tensors: Mapping[str, Shaped]) -> dict[str, int]:
    """Key (LoKr: the module) → input width, for the entries that show one."""
    out: dict[str, int] = {}
    lokr: dict[str, dict[str, int]] = {}
    for key, t in tensors.items():
        if len(t.shape) < 2:
            continue
        m = LOKR.match(key)
        if m:
            lokr.setdefault(m[1], {})[m[2].removesuffix("_b")] = t.shape[1]
        elif INPUT_LEAVES.search(key):
            out[key] = t.shape[1]
    for module, parts in lokr.items():
        if len(parts) == 2:
            out[module] = parts["lokr_w1"] * parts["lokr_w2"]
    return out


def base_from_shapes(tensors: Mapping[str, Shaped]) -> str | None:
    """The base the shapes show (rules in the module's docstring), or ``None`` when they do not."""
    by_part: dict[str, set[int]] = {"cross": set(), "te": set(), "unet": set()}
    for key, width in input_widths(tensors).items():
        part = component(key)
        if part == "te2":
            return Arch.SDXL
        by_part["te" if part == "te" else "cross" if CROSS.search(key) else "unet"].add(width)
    for part, table in (("cross", CONTEXT_WIDTH), ("te", TEXT_WIDTH), ("unet", UNET_CONTEXT_ONLY)):
        for width, base in table.items():
            if width in by_part[part]:
                return base
    return None
