"""What the UNet is conditioned on while training, the way diffusers' SD1/SD2/SDXL pipelines make it: captions →
text-encoder hidden states (SDXL: both encoders' penultimate layers side by side, the pooled output of the second)
and, for SDXL, the size/crop "time ids"; images → VAE latents (the distribution's mean, scaled)."""
from __future__ import annotations

from typing import Any

import torch

MAX_TOKENS = 77


def tokenize(tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def encode_text(pipe: Any, captions: list[str], sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (b, 77, width), pooled (b, 1280) for SDXL else ``None``)."""
    te = pipe.text_encoder
    device = next(te.parameters()).device
    if not sdxl:
        return te(tokenize(pipe.tokenizer, captions, device))[0], None
    te2 = pipe.text_encoder_2
    out1 = te(tokenize(pipe.tokenizer, captions, device), output_hidden_states=True)
    out2 = te2(tokenize(pipe.tokenizer_2, captions, device), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return hidden, out2[0]


def time_ids(size: tuple[int, int], n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's (original h, w, crop top, left, target h, w): the bucket size, no crop (images are cropped to it)."""
    w, h = size
    return torch.tensor([[h, w, 0, 0, h, w]] * n, device=device, dtype=dtype)


@torch.no_grad()
def encode_image(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(4, h/8, w/8) fp32 latents of one (3, h, w) image in [-1, 1]: the posterior mean, scaled (and shifted where
    the VAE says so). An fp16 VAE that asks for it (``force_upcast``: the SDXL VAE overflows in fp16) encodes in
    fp32, as diffusers' pipelines decode."""
    p = next(vae.parameters())
    upcast = p.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        dtype = torch.float32 if upcast else p.dtype
        latent = vae.encode(pixels[None].to(p.device, dtype)).latent_dist.mean.float()
    finally:
        if upcast:
            vae.to(p.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent - shift) * vae.config.scaling_factor)[0]
