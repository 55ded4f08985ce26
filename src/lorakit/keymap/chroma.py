"""Chroma as data. lodestones' Chroma (FLUX.1-schnell pruned and retrained; T5 only, no CLIP) keeps FLUX.1's BFL
names for its blocks — ``double_blocks``/``single_blocks`` with the fused ``qkv``/``linear1``, ``img_in``, ``txt_in``,
``final_layer.linear``: FLUX.1's map (``keymap/flux.py``) applies unchanged — but has no per-block modulation
(``img_mod``/``txt_mod``/``modulation``), no ``time_in``/``vector_in``/``guidance_in`` and no final adaLN. One
``distilled_guidance_layer`` (an MLP, the "approximator") makes every block's modulation from the timestep.

diffusers' ``ChromaTransformer2DModel`` names that layer the same except its MLP layers: BFL
``distilled_guidance_layer.layers.N.in_layer``/``out_layer`` are ``….layers.N.linear_1``/``linear_2``
(``PixArtAlphaTextProjection``); ``in_proj`` and ``out_proj`` keep their names.

A FLUX.1 LoRA's layers for what Chroma pruned map to modules a Chroma model lacks: they are reported per layer and
not applied (an error under ``strict``), as ``patch.plan`` does for any layer without a module.
"""
from __future__ import annotations

import re

from . import flux
from .layouts import Blocks, LayoutMap, SingleFile, Target
from .names import Vocabulary

HEAD = "distilled_guidance_layer"
VOCABULARY = Vocabulary(flux.VOCABULARY.compounds + (HEAD, "in_proj"))
_APPROXIMATOR = Blocks(f"{HEAD}.layers", f"{HEAD}.layers", {"in_layer": "linear_1", "out_layer": "linear_2"})
_TOP = {**flux.MAP.top, f"{HEAD}.in_proj": f"{HEAD}.in_proj", f"{HEAD}.out_proj": f"{HEAD}.out_proj"}
_MODEL_MLP = re.compile(rf"{HEAD}\.layers\.\d+\.linear_[12]")  # the model's names of the approximator's MLP


class _ChromaMap(LayoutMap):
    """FLUX.1's map plus the approximator, whose model names share its head (``distilled_guidance_layer``): those
    are the model's, not the original layout's."""

    def is_original(self, path: str) -> bool:
        return super().is_original(path) and _MODEL_MLP.fullmatch(path) is None


MAP = _ChromaMap(_TOP, (*flux.MAP.blocks, _APPROXIMATOR), (*flux.MAP.heads, HEAD), read_only=flux.MAP.read_only)

_NORM = re.compile(rf"{HEAD}\.norms\.\d+")  # the approximator's RMSNorms: in checkpoints, never a LoRA's target


def file_module(path: str) -> Target | None:
    """A Chroma checkpoint's module → the model's: ``MAP``, and the approximator's norms (the same names)."""
    return MAP.to_model(path) or (path if _NORM.fullmatch(path) else None)


# lodestones' checkpoints (``chroma-unlocked-v*.safetensors``, ``Chroma1-HD.safetensors``): BFL names with the
# approximator, bare or under ComfyUI's prefix; an all-in-one file's T5 and VAE as FLUX.1's
SINGLE_FILE = SingleFile("ChromaTransformer2DModel", re.compile(rf"^{HEAD}\.in_proj\."), file_module,
                         MAP.is_original, renames={"scale": "weight"},
                         text_encoders={"text_encoder": "text_encoders.t5xxl.transformer."}, ldm_vae=True)
