"""img2img and inpainting sampling: diffusers' img2img / inpaint pipelines made from the model's pipeline
(``from_pipe``: the same modules, so the LoRAs applied to them apply here), with A1111's latent fills.

A denoising strength of 0 samples nothing: the result is the init image through the VAE, as in A1111.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)

from ..models.loading import BaseModel
from ..train.encode import encode_image
from .conditioning import Conditioning
from .decode import latent_stats
from .init_image import InitImage, Prepared, latent_mask, steps_run
from .request import Settings
from .sampling import StepEnd


def derived_pipe(model: BaseModel, inpaint: bool) -> Any:
    """The model's pipeline as img2img or inpainting: shares every module and the current scheduler. Built from
    the components, not with ``from_pipe``, which casts every shared module to fp32 unless told the dtype."""
    if model.sdxl:
        cls: Any = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
    else:
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
    expected, optional = cls._get_signature_keys(cls)
    components = model.pipe.components
    parts = {name: components.get(name) for name in expected}
    config = model.pipe.config
    pipe = cls(**parts, **{k: config[k] for k in optional if k in config and k not in parts})
    if hasattr(model.pipe, "_progress_bar_config"):
        pipe.set_progress_bar_config(**model.pipe._progress_bar_config)
    return pipe


def sample_init(model: BaseModel, settings: Settings, size: tuple[int, int], cond: Conditioning,
                uncond: Conditioning, seeds: list[int], step_end: StepEnd, init: InitImage, prepared: Prepared,
                per_prompt: int = 1) -> torch.Tensor:
    """The latents after the last step (B, C, h, w), B = ``len(seeds)``, starting from ``prepared.image``
    (noise as in ``sampling.sample``: one CPU generator per image, seeded with its seed)."""
    if steps_run(settings.steps, init.strength) == 0:
        return encoded_init(model, prepared, len(seeds))
    pipe = derived_pipe(model, prepared.mask is not None)
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds, "image": prepared.image,
        "strength": init.strength, "num_inference_steps": settings.steps, "guidance_scale": settings.cfg,
        "num_images_per_prompt": per_prompt, "output_type": "latent",
        "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
        "callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
    if prepared.mask is not None:
        kwargs.update(mask_image=prepared.mask, width=size[0], height=size[1])
        if init.fill in (2, 3):
            _fill_latents(pipe, prepared, init.fill)
    if model.sdxl:
        kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    with torch.no_grad():
        return pipe(**kwargs).images  # type: ignore[no-any-return]


def _fill_latents(pipe: Any, prepared: Prepared, fill: int) -> None:
    """A1111's "latent noise" (2) and "latent nothing" (3): the init latents under the mask replaced by the run's
    noise or by zeros, before noise is added and in every step's blend (4-channel UNets; a 9-channel inpainting
    UNet sees the masked image itself)."""
    mask = prepared.mask
    assert mask is not None
    original = pipe.prepare_latents

    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if len(out) != 3:
            return out
        latents, noise, image_latents = out
        m = latent_mask(mask, (image_latents.shape[-1], image_latents.shape[-2]), image_latents)
        filled = image_latents * (1 - m) + (noise * m if fill == 2 else 0)
        if not kwargs.get("is_strength_max", True):
            latents = pipe.scheduler.add_noise(filled, noise, kwargs["timestep"])
        return latents, noise, filled

    pipe.prepare_latents = prepare_latents


def encoded_init(model: BaseModel, prepared: Prepared, count: int) -> torch.Tensor:
    """The init image's latents (the VAE's mean, scaled as ``decode.unscaled`` unscales them), ``count`` times —
    encoded by training's ``encode_image`` (an fp16 VAE that asks for it encodes in fp32)."""
    vae = model.pipe.vae
    pixels = model.pipe.image_processor.preprocess(prepared.image)[0]
    latents = encode_image(vae, pixels)[None].to(vae.dtype)  # (latent − shift) · scale
    stats = latent_stats(vae, latents)
    if stats is not None:  # the normalised latents decode un-normalises
        latents = (latents / vae.config.scaling_factor - stats[0]) * vae.config.scaling_factor / stats[1]
    return latents.repeat(count, 1, 1, 1)


def derived_pipeline(pipe: Any, cls: Any) -> Any:
    """A pipeline of class ``cls`` (a family's img2img / inpaint / control pipeline) on the same modules, built from
    the components: no fp32 cast, as ``from_pipe`` would make."""
    expected, _ = cls._get_signature_keys(cls)
    out = cls(**{name: pipe.components.get(name) for name in expected})
    if hasattr(pipe, "_progress_bar_config"):
        out.set_progress_bar_config(**pipe._progress_bar_config)
    return out
