"""A1111-style single-file checkpoints (``.safetensors``/``.ckpt``): what the file is, from its tensors, and an
offline SD1 pipeline built from it with the shipped configs (components made on the ``meta`` device, then filled
with the converted tensors — no random initialisation, no download).

SD2 and SDXL single files are recognised and refused with a clear message for now (their OpenCLIP text encoder
conversion is not covered by tests yet); use a diffusers folder for them.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .arch import foreign_family
from .errors import LorakitError

UNET_PREFIX = "model.diffusion_model."


class CheckpointError(LorakitError):
    """A file that is not a usable Stable Diffusion checkpoint (names the file and why)."""


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from .io import load_file

    return load_file(path)[0]


def checkpoint_arch(sd: Mapping[str, torch.Tensor], path: Path) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from key names; a clear error for LoRAs and other files."""
    keys = list(sd)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        family = foreign_family(keys, {})
        if family:
            raise CheckpointError(f"{path}: a {family} file; lorakit runs Stable Diffusion 1.x, 2.x and XL models")
        from .formats import to_canonical

        if to_canonical(dict(sd), {}) is not None:
            raise CheckpointError(f"{path}: this is a LoRA, not a base model — put it in a LoRA folder "
                                  "(--lora-dir) and name it in the prompt")
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys)")
    if any(k.startswith("conditioner.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return "sd1"


def sd1_pipeline(sd: Mapping[str, torch.Tensor], path: Path, configs: Mapping[str, Mapping[str, Any]]) -> Any:
    """Build a StableDiffusionPipeline from an SD1 single-file state dict and component configs."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    from .samplers import scheduler_for
    from .tokenizer import clip_tokenizer

    sd = dict(sd)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    _fill(unet, convert_ldm_unet_checkpoint(sd, dict(unet.config)), path, "UNet")
    _fill(vae, convert_ldm_vae_checkpoint(sd, dict(vae.config)), path, "VAE")
    te = convert_ldm_clip_checkpoint(sd)
    if not hasattr(text_encoder, "text_model"):  # transformers 5 CLIPTextModel has no text_model level
        te = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in te.items()}
    te.pop("embeddings.position_ids", None)
    _fill(text_encoder, te, path, "text encoder")
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(),
                                   unet=unet.eval(), scheduler=scheduler_for("Euler a"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{path}: the {what} lacks {len(missing)} tensors (e.g. {missing[0]}); not a complete "
                              "SD1 checkpoint")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(module.state_dict()[k].shape)]
    if wrong:
        raise CheckpointError(f"{path}: the {what} tensor {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected "
                              f"{tuple(module.state_dict()[wrong[0]].shape)}")
    module.load_state_dict({k: state[k].float() for k in expected}, assign=True, strict=True)
    _materialize_buffers(module, path, what)


def _materialize_buffers(module: torch.nn.Module, path: Path, what: str) -> None:
    """Non-persistent buffers are not in a state dict, so building on ``meta`` leaves them empty: recreate them
    (CLIP's ``position_ids`` is ``arange``); any other leftover is an error, never silent garbage."""
    for name, buf in list(module.named_buffers()):
        if buf.device.type != "meta":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf == "position_ids":
            owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
        else:
            raise CheckpointError(f"{path}: the {what}'s buffer {name} cannot be built offline")
