"""A1111-style single-file checkpoints (``.safetensors``/``.ckpt``): what the file is, from its tensors, and an
offline SD1 / SD2 / SDXL pipeline built from it with the shipped configs (components made on the ``meta`` device,
then filled with the tensors converted by diffusers' LDM converters — no random initialisation, no download).

SD2 single files are taken to predict v (SD2.x 768, as diffusers also assumes); an SD2 512-base model is
epsilon — use it as a diffusers folder, whose scheduler says so.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..keymap.arch import Arch
from ..keymap.detection import foreign_name
from ..quant.layers import FP8

UNET_PREFIX = "model.diffusion_model."


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from ..files.io import load_file

    return load_file(path)[0]


def checkpoint_arch(sd: Mapping[str, torch.Tensor], path: Path) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from key names; a clear error for LoRAs and other files."""
    keys = list(sd)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        family = foreign_name(keys, {})
        if family:
            raise CheckpointError(f"{path}: a {family} file; lorakit runs Stable Diffusion 1.x, 2.x and XL models")
        from ..formats import to_canonical

        if to_canonical(dict(sd), {}) is not None:
            raise CheckpointError(f"{path}: this is a LoRA, not a base model — put it in a LoRA folder "
                                  "(--lora-dir) and name it in the prompt")
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys)")
    if any(k.startswith("conditioner.") for k in keys):
        return Arch.SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return Arch.SD2
    return Arch.SD1


def default_configs(arch: str) -> dict[str, Mapping[str, Any]]:
    from .configs import (
        CLIP_G,
        CLIP_L,
        OPENCLIP_H,
        SD1_UNET,
        SD2_UNET,
        SD_VAE,
        SDXL_UNET,
        SDXL_VAE,
    )

    configs: dict[Arch, dict[str, Mapping[str, Any]]] = {
        Arch.SD1: {"unet": SD1_UNET, "vae": SD_VAE, "text_encoder": CLIP_L},
        Arch.SD2: {"unet": SD2_UNET, "vae": SD_VAE, "text_encoder": OPENCLIP_H},
        Arch.SDXL: {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G}}
    return configs[Arch(arch)]


def build_pipeline(sd: Mapping[str, torch.Tensor], path: Path, arch: str,
                   configs: Mapping[str, Mapping[str, Any]], dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers pipeline (on the CPU, floating weights in ``dtype``) from a single-file state dict of ``arch``
    and component configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd = dict(sd)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
    unet_state = convert_ldm_unet_checkpoint(sd, dict(unet.config))
    if any(t.dtype in FP8 for t in unet_state.values()):  # an fp8 checkpoint: the UNet keeps fp8 storage
        from ..quant.build import fill_quantized

        if any(k.endswith(("scale_weight", "weight_scale")) for k in sd):
            raise CheckpointError(f"{path}: a scaled fp8 SD checkpoint; lorakit reads scaled fp8 FLUX.1 files and "
                                  "unscaled fp8 SD/SDXL checkpoints")
        names = {n for n, _ in unet.named_parameters()}
        fill_quantized(unet, {k: v for k, v in unet_state.items() if k in names}, {}, path, "UNet", dtype)
    else:
        _fill(unet, unet_state, path, "UNet", dtype)
    _fill(vae, convert_ldm_vae_checkpoint(sd, dict(vae.config)), path, "VAE", dtype)
    encoders = _text_encoders(sd, path, arch, configs, dtype)
    return _assemble(arch, unet.eval(), vae.eval(), encoders)


def _text_encoders(sd: dict[str, torch.Tensor], path: Path, arch: str,
                   configs: Mapping[str, Mapping[str, Any]], dtype: torch.dtype) -> list[torch.nn.Module]:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        first = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        second = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])) if arch == Arch.SDXL else None
    if arch == Arch.SD1:
        states = [convert_ldm_clip_checkpoint(sd)]
    elif arch == Arch.SD2:
        states = [convert_open_clip_checkpoint(first, sd, prefix="cond_stage_model.model.")]
    else:
        states = [convert_ldm_clip_checkpoint(sd, remove_prefix="conditioner.embedders.0.transformer."),
                  convert_open_clip_checkpoint(second, sd, prefix="conditioner.embedders.1.model.")]
    out = []
    for i, (encoder, state) in enumerate(zip([first, second], states)):
        assert encoder is not None
        _fill(encoder, _for_module(state, encoder), path, f"text encoder {i + 1}", dtype)
        out.append(encoder.eval())
    return out


def _for_module(state: dict[str, torch.Tensor], encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Converted keys say ``text_model.…``; transformers 5 ``CLIPTextModel`` has no such level."""
    if hasattr(encoder, "text_model"):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _assemble(arch: str, unet: Any, vae: Any, encoders: list[torch.nn.Module]) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..generate.samplers import scheduler_for
    from ..generate.tokenizer import PAD_OPENCLIP, clip_tokenizer

    scheduler = scheduler_for("Euler a", "v_prediction" if arch == Arch.SD2 else "epsilon")
    if arch == Arch.SDXL:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer(),
                                         text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer(PAD_OPENCLIP),
                                         unet=unet, scheduler=scheduler)
    tokenizer = clip_tokenizer(PAD_OPENCLIP if arch == Arch.SD2 else "<|endoftext|>")
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str,
          dtype: torch.dtype = torch.float32) -> None:
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{path}: the {what} lacks {len(missing)} tensors (e.g. {missing[0]}); not a complete "
                              "checkpoint of this architecture")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(module.state_dict()[k].shape)]
    if wrong:
        raise CheckpointError(f"{path}: the {what} tensor {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected "
                              f"{tuple(module.state_dict()[wrong[0]].shape)}")
    module.load_state_dict({k: state[k].to(dtype) if state[k].is_floating_point() else state[k] for k in expected},
                           assign=True, strict=True)
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
            device = next(module.parameters()).device  # beside the weights just filled in
            ids = torch.arange(buf.shape[-1], dtype=buf.dtype, device=device).expand(buf.shape).clone()
            owner.register_buffer(leaf, ids, persistent=False)
        else:
            raise CheckpointError(f"{path}: the {what}'s buffer {name} cannot be built offline")
