"""Chroma as data. lodestones' Chroma (FLUX.1-schnell pruned and retrained; T5 only, no CLIP) keeps FLUX.1's BFL
names for its blocks — ``double_blocks``/``single_blocks`` with the fused ``qkv``/``linear1``, ``img_in``, ``txt_in``,
``final_layer.linear``: FLUX.1's table (``keymap/flux.py``) applies unchanged — but has no per-block modulation
(``img_mod``/``txt_mod``/``modulation``), no ``time_in``/``vector_in``/``guidance_in`` and no final adaLN. One
``distilled_guidance_layer`` (an MLP, the "approximator") makes every block's modulation from the timestep.

diffusers' ``ChromaTransformer2DModel`` names that layer the same except its MLP layers: BFL
``distilled_guidance_layer.layers.N.in_layer``/``out_layer`` are ``….layers.N.linear_1``/``linear_2``
(``PixArtAlphaTextProjection``); ``in_proj``, ``out_proj`` and the RMSNorms ``norms.N`` keep their names.

A FLUX.1 LoRA's layers for what Chroma pruned map to modules a Chroma model lacks: they are reported per layer and
not applied (an error under ``strict``), as ``patch.plan`` does for any layer without a module.
"""
from __future__ import annotations

import re

from . import flux
from .names import Vocabulary

HEAD = "distilled_guidance_layer"
VOCABULARY = Vocabulary(flux.VOCABULARY.compounds + (HEAD, "in_proj"))
_MLP = re.compile(rf"{HEAD}\.layers\.(\d+)\.(in_layer|out_layer)")  # BFL names of the approximator's MLP layers
_MLP_MODEL = re.compile(rf"{HEAD}\.layers\.(\d+)\.(linear_1|linear_2)")
_SAME = re.compile(rf"{HEAD}\.(?:in_proj|out_proj|norms\.\d+)")  # named alike in both layouts
_TO_MODEL = {"in_layer": "linear_1", "out_layer": "linear_2"}
_TO_BFL = {v: k for k, v in _TO_MODEL.items()}


def is_original(path: str) -> bool:
    """Whether a transformer module path is in the BFL layout (FLUX.1's names, the approximator's MLP names)."""
    return flux.is_bfl_path(path) or _MLP.fullmatch(path) is not None


def to_model(path: str) -> flux.Target | None:
    """The diffusers module(s) of a BFL module path; ``None`` when the name is neither Chroma's nor FLUX.1's."""
    m = _MLP.fullmatch(path)
    if m is not None:
        return f"{HEAD}.layers.{m[1]}.{_TO_MODEL[m[2]]}"
    if _SAME.fullmatch(path):
        return path
    return flux.to_model(path)


def to_original(path: str) -> str | None:
    """The BFL name of a renamed diffusers module (``….layers.0.linear_1`` → ``….layers.0.in_layer``)."""
    m = _MLP_MODEL.fullmatch(path)
    if m is not None:
        return f"{HEAD}.layers.{m[1]}.{_TO_BFL[m[2]]}"
    if _SAME.fullmatch(path):
        return path
    return flux.to_original(path)


def is_written(path: str) -> bool:
    """Whether a BFL module path is one a Chroma checkpoint has (FLUX.1's, less its reader-only aliases)."""
    return _MLP.fullmatch(path) is not None or _SAME.fullmatch(path) is not None or flux.is_written(path)


LAYOUT = flux.Layout(to_model, is_original, to_original, flux.fused_home, is_written)
