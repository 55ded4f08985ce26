"""SD3 / SD3.5 base models: diffusers folders (``StableDiffusion3Pipeline``), and SAI single files —
``sd3_medium.safetensors``, ``sd3.5_large.safetensors`` (``model.diffusion_model.`` + ``first_stage_model.``), with
or without ``text_encoders.clip_l``/``clip_g``/``t5xxl`` (the ``_incl_clips…`` files), or a bare transformer — whose
transformer is converted with lorakit's own SAI map (``keymap.sd3``: fused rows split by the config's hidden width,
the last block's context adaLN and the final layer's halves swapped), offline.

A single file carries no tokenizers (and often no text encoders): those come from an SD3 diffusers folder named by
``components`` (``--components DIR``, ``$LORAKIT_COMPONENTS``), which also gives the scheduler and, when it has one,
the transformer's config; else the shipped config of the size the file shows (``models/sd3_configs.py``: 2432 wide
is 3.5-Large, ``attn2`` layers 3.5-Medium, else SD3-Medium).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import ModelError
from ..files.inputs import read_json
from ..keymap import sd3 as sd3map
from ..keymap.arch import Arch
from .dit_files import (build_on_meta, folder_config, prefixed, replace_encoders, replace_vae,
                        split_original)

ARCHES = (Arch.SD3_MEDIUM, Arch.SD35_MEDIUM, Arch.SD35_LARGE)
HALF = torch.bfloat16  # SD3.5's activations are run in bf16 (the model cards, diffusers' docs)
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
TE_PREFIXES = dict(sd3map.SINGLE_FILE.text_encoders)  # an all-in-one file's CLIP-L, CLIP-G and T5
T = TypeVar("T")


def is_index(index: Mapping[str, Any]) -> bool:
    """Whether a ``model_index.json`` is an SD3 pipeline's (StableDiffusion3Pipeline, its img2img/inpaint)."""
    return str(index.get("_class_name", "")).startswith("StableDiffusion3")


def transformer_keys(sd: Mapping[str, T]) -> dict[str, T]:
    """The transformer entries of a single file, prefixes stripped (a bare SAI transformer file has none)."""
    return prefixed(sd, PREFIXES, lambda key: sd3map.MAP.is_original(key) or key == "pos_embed")


def is_file(sd: Mapping[str, Any]) -> bool:
    """Whether a single file's keys are an SD3 transformer's (SAI names)."""
    return any(sd3map.KEYS.search(k) for k in list(transformer_keys(sd))[:64])


def load_folder(path: Path, dtype: torch.dtype, transformer: bool = True) -> Any:
    """A StableDiffusion3Pipeline from a diffusers folder, offline (``transformer=False``: all but the transformer,
    which a single file then gives — the folder's is never read)."""
    from diffusers import StableDiffusion3Pipeline

    skip: dict[str, Any] = {} if transformer else {"transformer": None}
    try:
        return StableDiffusion3Pipeline.from_pretrained(str(path), local_files_only=True, dtype=dtype, **skip)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelError(f"{path}: could not load the SD3 model ({type(e).__name__}: {str(e)[:200]})") from None


def sai_to_diffusers(sd: Mapping[str, torch.Tensor], hidden: int, path: Path) -> dict[str, torch.Tensor]:
    """SAI transformer tensors → ``SD3Transformer2DModel`` names (the position table ``pos_embed`` →
    ``pos_embed.pos_embed``)."""
    rest = {k: v for k, v in sd.items() if k != "pos_embed"}
    out = split_original(rest, hidden, path, sd3map.MAP.to_model, "SD3 transformer")
    if "pos_embed" in sd:
        out["pos_embed.pos_embed"] = sd["pos_embed"]
    return out


def size_of_file(sd: Mapping[str, Any]) -> str:
    """SD3-Medium, 3.5-Medium or 3.5-Large from a SAI transformer's tensors (``x_embedder``'s rows: the width)."""
    proj = sd.get("x_embedder.proj.weight")
    hidden = int(proj.shape[0]) if proj is not None else None
    if hidden == 2432:
        return Arch.SD35_LARGE
    return Arch.SD35_MEDIUM if any(".attn2." in k for k in sd) else Arch.SD3_MEDIUM


def transformer_config(components: Path | None, sd: Mapping[str, Any]) -> dict[str, Any]:
    """The components folder's ``transformer/config.json``, else the shipped config of the size the file shows."""
    cfg = folder_config(components)
    if cfg is not None:
        return cfg
    from .sd3_configs import transformer_config as shipped

    return shipped(size_of_file(sd))


def build_transformer(sai: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: Path,
                      dtype: torch.dtype) -> Any:
    """A SD3Transformer2DModel made on ``meta`` and filled with the converted tensors (no random init)."""
    from diffusers import SD3Transformer2DModel

    return build_on_meta(SD3Transformer2DModel, config, lambda hidden: sai_to_diffusers(sai, hidden, path), path,
                         "SD3 transformer", dtype)


def load_single_file(path: Path, sd: Mapping[str, torch.Tensor], components: Path | None, dtype: torch.dtype,
                     quantized: Any = None) -> Any:
    """A StableDiffusion3Pipeline from a SAI single file plus an SD3 diffusers folder for what the file lacks."""
    if quantized is not None:
        raise ModelError(f"{path}: a quantized SD3 file; lorakit reads quantized FLUX.1 files only")
    if components is None:
        raise ModelError(f"{path}: an SD3 single file carries no tokenizers (often no text encoders either): name "
                         "an SD3 diffusers folder to take them from with --components DIR (or $LORAKIT_COMPONENTS)")
    if not _is_folder(components):
        raise ModelError(f"{components}: not an SD3 diffusers folder (no model_index.json of an SD3 pipeline)")
    base = load_folder(components, dtype, transformer=False)
    sai = transformer_keys(sd)
    base.register_modules(transformer=build_transformer(sai, transformer_config(components, sai), path, dtype))
    replace_encoders(base, sd, path, dtype, TE_PREFIXES)
    replace_vae(base, sd, path, dtype)
    return base


def _is_folder(path: Path) -> bool:
    try:
        index = read_json(path / "model_index.json")
        return isinstance(index, dict) and is_index(index)
    except ValueError:
        return False


def arch_of(pipe: Any) -> str:
    """SD3-Medium, 3.5-Medium or 3.5-Large, from the transformer's config (``keymap.sd3.Sizes``)."""
    return sd3map.SIZES.of_model({"transformer": pipe.transformer})


def variant(pipe: Any) -> str:
    return arch_of(pipe)
