"""Qwen-Image's latents: its VAE (``AutoencoderKLQwenImage``, Wan 2.1's 3-D VAE) works on (B, C, frames, h, w) and
normalises each latent channel by the config's ``latents_mean``/``latents_std`` (no scaling factor); the pipeline
packs the latents into 2×2 patches (B, h·w/4, 4·C). Model folders load through ``models.loading`` (``QwenImage*``
pipeline classes: ``Family.pipelines``)."""
from __future__ import annotations

from typing import Any

import torch


def _stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std (1, C, 1, 1, 1) on ``like``'s device in its dtype."""
    shape = (1, int(vae.config.z_dim), 1, 1, 1)
    return (torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape),
            torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape))


def vae_in(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, h, w) or (B, C, 1, h, w) → the VAE's input (B, C, 1, h, w): x·std + mean (what
    ``QwenImagePipeline`` does before decoding)."""
    latents = latents[:, :, None] if latents.dim() == 4 else latents
    mean, std = _stats(vae, latents)
    return latents * std + mean


def encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (C, H, W) or (B, C, H, W) in [-1, 1] → normalised latents (B, C, h, w), fp32: the VAE's mean,
    (μ - mean) / std — the pipeline's ``_encode_vae_image`` with the mode instead of a sample."""
    x = pixels[None] if pixels.dim() == 3 else pixels
    with torch.no_grad():
        mu = vae.encode(x[:, :, None].to(vae.device, vae.dtype)).latent_dist.mode()
    mean, std = _stats(vae, mu)
    return ((mu - mean) / std)[:, :, 0].float()
