"""Never a silent black image: latents and pixels are checked for NaN/inf, and a half-precision VAE that overflows
decodes again in fp32 (A1111's automatic ``--no-half-vae``)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import NonFiniteOutput

log = logging.getLogger("lorakit")


def check_latents(latents: torch.Tensor, step: int, steps: int) -> None:
    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteOutput(f"NaN/inf appeared in the latents at step {step} of {steps} (the UNet's output); no "
                              "image was written. Usual causes: a LoRA weight far too high, LoRAs for another base "
                              "model, or a half-precision model that overflows (try --dtype fp32 or bf16)")


VaeIn = Callable[[Any, torch.Tensor], torch.Tensor]  # (vae, latents in the VAE's dtype) → what vae.decode reads


def decode(pipe: Any, latents: torch.Tensor, vae_in: VaeIn | None = None) -> list[Any]:
    """Latents (B, C, h, w) → PIL images, through the pipeline's VAE and image processor (VAE tiling is the
    model's: ``BaseModel.set_vae_tiling``). ``vae_in``: how the family's latents become the VAE's input (default:
    the SD/FLUX scale, statistics and shift of ``unscaled``); a video VAE's (B, 3, frames, H, W) gives frame 0."""
    image = _decode_checked(pipe.vae, latents, vae_in or unscaled)
    return list(pipe.image_processor.postprocess(image.float(), output_type="pil"))


def _decode_checked(vae: Any, latents: torch.Tensor, vae_in: VaeIn) -> torch.Tensor:
    half = vae.dtype in (torch.float16, torch.bfloat16)
    if half and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return _in_fp32(vae, latents, vae_in)  # VAEs known to overflow in fp16 (SDXL's) say so in their config
    image = _decode(vae, latents, vae_in)
    if not bool(torch.isfinite(image).all()) and half:
        log.warning(f"the VAE produced NaN/inf in {str(vae.dtype).removeprefix('torch.')}; decoding again in fp32 "
                    "(as A1111's --no-half-vae)")
        image = _in_fp32(vae, latents, vae_in)
    if not bool(torch.isfinite(image).all()):
        raise NonFiniteOutput("NaN/inf appeared in the decoded image (the VAE's output); no image was written")
    return image


def _in_fp32(vae: Any, latents: torch.Tensor, vae_in: VaeIn) -> torch.Tensor:
    dtype = vae.dtype
    vae.to(torch.float32)  # fp16/bf16 → fp32 → back is lossless: the VAE's weights come back bit-exact
    try:
        return _decode(vae, latents.float(), vae_in)
    finally:
        vae.to(dtype)


def _decode(vae: Any, latents: torch.Tensor, vae_in: VaeIn) -> torch.Tensor:
    with torch.no_grad():
        image = vae.decode(vae_in(vae, latents.to(vae.dtype)), return_dict=False)[0]
    return image[:, :, 0] if image.dim() == 5 else image


def unscaled(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The diffusers decode's input: unscale (and un-normalise where the VAE has latent statistics, un-shift where
    it has a shift: FLUX's)."""
    stats = latent_stats(vae, latents)
    if stats is not None:
        latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
    else:
        latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents + shift
    return latents


def latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel latent mean and std (1, C, 1, 1) on ``like``'s device in its dtype, where its config
    has them (some SDXL-family VAEs); else ``None``."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, like.shape[1], 1, 1)
    return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
            torch.tensor(std, device=like.device, dtype=like.dtype).view(shape))
