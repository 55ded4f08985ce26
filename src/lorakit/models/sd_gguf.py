"""SD1/SD2/SDXL UNets in GGUF single files — ComfyUI-GGUF's (``general.architecture`` ``sd1``/``sdxl``, LDM names
without prefix, tensors reshaped to rows of 256 values with ``comfy.gguf.orig_shape``) and stable-diffusion.cpp's
(``model.diffusion_model.`` prefix, no architecture; only the UNet is read) — and diffusers-named UNets. The UNet
is built on ``meta`` and filled with the file's tensors (LDM names converted by diffusers' converter, which only
renames): quantized Linears and convolutions keep their GGUF blocks (``quant/build.py``), F16/F32 tensors are dense.
The rest of the pipeline — text encoders, tokenizers, VAE, scheduler, the UNet's config — comes from an SD/SDXL
diffusers folder (``--components DIR``), the rule of FLUX.1's transformer-only files; its own UNet is never loaded.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..files.inputs import read_json
from ..keymap.arch import NAMES, Arch
from .dit_files import folder_config

PREFIX = "model.diffusion_model."
LDM_HEADS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
DIFFUSERS_HEADS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.",
                   "time_embedding.", "add_embedding.")
ARCHITECTURES = {"sdxl": Arch.SDXL, "sd1": Arch.SD1}  # GGUF ``general.architecture`` (ComfyUI-GGUF's convert)


def unet_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's tensors, prefix stripped: those under ``model.diffusion_model.`` when the file has any (a
    stable-diffusion.cpp file also holds the text encoders and the VAE), else every tensor."""
    if any(k.startswith(PREFIX) for k in tensors):
        return {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return dict(tensors)


def is_unet_file(tensors: Mapping[str, Any]) -> bool:
    """Whether a file's (prefix-stripped) names are an SD UNet's, in LDM or diffusers names."""
    keys = list(unet_tensors(tensors))  # type: ignore[arg-type]
    ldm = any(k.startswith("input_blocks.") for k in keys) and any(k.startswith("middle_block.") for k in keys)
    return ldm or (any(k.startswith("down_blocks.") for k in keys) and any(k.startswith("mid_block.") for k in keys))


def file_arch(tensors: Mapping[str, Any], architecture: str | None) -> Arch:
    """SDXL or SD1 (the components folder tells SD1 from SD2): ``general.architecture``, else the SDXL-only
    added embedding (``label_emb`` / ``add_embedding``)."""
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[str(architecture)]
    keys = unet_tensors(tensors)  # type: ignore[arg-type]
    return Arch.SDXL if any(k.startswith(("label_emb.", "add_embedding.")) for k in keys) else Arch.SD1


def sd_pipeline_class(index: Mapping[str, Any]) -> Any:
    """The diffusers pipeline class of an SD/SDXL folder's ``model_index.json``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if "XL" in str(index.get("_class_name", "")) else StableDiffusionPipeline


def load_gguf_unet(path: Path, quantized: Any, components: Path | None, dtype: torch.dtype) -> tuple[Any, Arch]:
    """A pipeline whose UNet is the GGUF file's (quantized layers kept) and whose other parts come from the SD/SDXL
    diffusers folder ``components``; with its architecture. ``ModelError`` before anything is built for a missing
    or mismatched folder, after the UNet is built (never half-filled) for a tensor the UNet does not take."""
    arch = file_arch(quantized.tensors, quantized.architecture)
    if components is None:
        raise ModelError(f"{path}: a GGUF UNet carries no text encoders, tokenizers or VAE: name a "
                         f"{NAMES[arch]} diffusers folder to take them from with --components DIR "
                         "(or $LORAKIT_COMPONENTS)")
    cls = _components_class(path, arch, components)
    config = folder_config(components, "unet") or _default_unet(arch)
    unet = build_unet(unet_tensors(quantized.tensors), config, path, dtype)
    extra = {} if arch == Arch.SDXL else dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(components), local_files_only=True, dtype=dtype, unet=unet, **extra)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelError(f"{components}: could not load the model's other components ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    from ..patch.targets import model_arch

    return pipe, Arch.SDXL if arch == Arch.SDXL else Arch(model_arch({"unet": pipe.unet}))


def build_unet(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: Path,
               dtype: torch.dtype) -> Any:
    """A ``UNet2DConditionModel(**config)`` on ``meta`` filled with the file's UNet tensors (LDM or diffusers
    names); GGUF blocks kept (``quant.build.fill_quantized``)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ..quant.build import fill_quantized

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    state = dict(tensors)
    if any(k.startswith(LDM_HEADS) for k in state):
        try:  # renames only: every tensor object is moved as it is (GGUF blocks, their recorded shapes)
            state = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in state.items()}, dict(unet.config))
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise ModelError(f"{path}: the UNet's LDM names do not fit its config ({type(e).__name__}: "
                             f"{str(e)[:160]})") from None
    return fill_quantized(unet, state, {}, path, "UNet", dtype)


def _components_class(path: Path, arch: Arch, components: Path) -> Any:
    """The pipeline class of the components folder, which must be an SD/SDXL folder of the file's architecture."""
    index_path = components / "model_index.json"
    try:
        index = read_json(index_path) if index_path.is_file() else None
    except ValueError as e:
        raise ModelError(f"{index_path}: unreadable ({str(e)[:200]})") from None
    if not isinstance(index, dict) or not str(index.get("_class_name", "")).startswith("StableDiffusion"):
        raise ModelError(f"{components}: not a Stable Diffusion diffusers folder (no model_index.json of a "
                         "StableDiffusion(XL)Pipeline)")
    cls = sd_pipeline_class(index)
    if (cls.__name__ == "StableDiffusionXLPipeline") != (arch == Arch.SDXL):
        raise ModelError(f"{path}: a {NAMES[arch]} UNet; {components} is a {index['_class_name']} folder")
    return cls


def _default_unet(arch: Arch) -> Mapping[str, Any]:
    from .configs import SD1_UNET, SDXL_UNET

    return SDXL_UNET if arch == Arch.SDXL else SD1_UNET
