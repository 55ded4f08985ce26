"""One diffusers sampling call: conditionings in, latents out — for one request or a mixed-LoRA batch of them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..models.loading import BaseModel
from .conditioning import Conditioning
from .request import Settings

StepEnd = Callable[..., dict[str, Any]]  # diffusers' callback_on_step_end


def sample(model: BaseModel, settings: Settings, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
           seeds: list[int], step_end: StepEnd, per_prompt: int = 1) -> torch.Tensor:
    """The latents after the last step (B, C, h, w), B = ``len(seeds)``. ``cond``/``uncond``: (P, L, width) with
    B = P·``per_prompt`` (diffusers repeats each prompt ``per_prompt`` times). ``size``: (width, height). Each
    image's noise (initial and ancestral) is drawn on its own CPU generator seeded with its seed, as A1111 does by
    default: a seed gives the same noise alone, in a batch, and on every device."""
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds, "num_inference_steps": settings.steps,
        "guidance_scale": settings.cfg, "width": size[0], "height": size[1], "num_images_per_prompt": per_prompt,
        "generator": [torch.Generator().manual_seed(seed) for seed in seeds], "output_type": "latent",
        "callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
    if model.sdxl:
        kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    with torch.no_grad():
        return model.pipe(**kwargs).images  # type: ignore[no-any-return]


def stack(conds: list[Conditioning], repeats: list[int]) -> Conditioning:
    """One conditioning for a batch: ``conds[i]`` (1, L, width) repeated ``repeats[i]`` times (its images), in
    order — the rows diffusers would make of each with ``num_images_per_prompt``. Conditionings of different
    lengths (an LLM encoder's: Qwen-Image) are padded with zeros to the longest, and their ``mask`` says which
    tokens count (what diffusers does for a batch of prompts)."""
    longest = max(c.embeds.shape[1] for c in conds)
    ragged = any(c.embeds.shape[1] != longest for c in conds)
    embeds = torch.cat([_pad(c.embeds, longest).repeat(n, 1, 1) for c, n in zip(conds, repeats)])
    pooled = [c.pooled for c in conds]
    masks = [c.mask if c.mask is not None or not ragged else _ones(c) for c in conds]
    mask = None if any(m is None for m in masks) else \
        torch.cat([_pad(m, longest).repeat(n, 1) for m, n in zip(masks, repeats) if m is not None])
    if any(p is None for p in pooled):
        return Conditioning(embeds, None, mask)
    return Conditioning(embeds, torch.cat([p.repeat(n, 1) for p, n in zip(pooled, repeats) if p is not None]), mask)


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (1, L[, width]) zero-padded along L to ``length``."""
    if t.shape[1] == length:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))], dim=1)


def _ones(c: Conditioning) -> torch.Tensor:
    return torch.ones(c.embeds.shape[:2], dtype=torch.long, device=c.embeds.device)
