"""Chroma: T5 conditioning with its attention mask (Chroma masks the padding, all but the first pad token), the
flow-matching Euler sampler of the model's scheduler config, **real CFG** (``guidance_scale`` with the negative
prompt; Chroma has no distilled guidance), packed latents and FLUX.1's VAE — diffusers' ``ChromaPipeline`` and its
img2img / inpainting pipelines.

``cfg`` is the CFG scale (default 4.0, as Chroma's model card); at ``cfg`` ≤ 1 one pass runs and the negative
prompt is not encoded. Prompts: A1111 emphasis is read as plain text (as on FLUX.1); clip skip and
textual-inversion embeddings do not apply. FLUX.1 LoRAs apply to Chroma (``keymap.families.fits``); their layers
for what Chroma pruned (modulations, ``time_in``/``vector_in``/``guidance_in``) are reported, not applied.

A real model folder needs what ``ChromaPipeline`` lists: ``tokenizer/`` (T5), ``text_encoder/`` (T5-XXL),
``transformer/``, ``vae/`` and ``scheduler/``.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import ChromaImg2ImgPipeline, ChromaInpaintPipeline, ChromaPipeline

from ..library import EmbeddingIndex
from ..models.loading import BaseModel
from .conditioning import Conditioning
from .decode import decode
from .dit_family import DiffusersDiT
from .family import StepEnd
from .flux_family import plain_text
from .request import Rules

DEFAULTS = {"steps": 26, "cfg": 4.0, "sampler": "Euler"}
SEQUENCE = 512  # T5 tokens, as Chroma was trained


class Chroma(DiffusersDiT):
    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        super().__init__(model, embeddings)
        self.rules = Rules(defaults=dict(DEFAULTS), samplers=("Euler",), fast_loras=False, clip_skip=False,
                           size_step=2 * int(model.pipe.vae_scale_factor), family="Chroma")

    @property
    def clip_layers(self) -> int:
        return 1  # no CLIP: no clip skip

    def encode(self, text: str, negative: str, settings: Any) -> tuple[Conditioning, Conditioning]:
        cond = self._encode(text)
        return cond, (self._encode(negative) if settings.cfg > 1 else cond)

    def _encode(self, text: str) -> Conditioning:
        """(1, 512, width) T5 embeddings and their mask (1, 512)."""
        pipe = self.model.pipe
        with torch.no_grad():
            embeds, mask = pipe._get_t5_prompt_embeds(prompt=plain_text(text), max_sequence_length=SEQUENCE,
                                                      device=pipe._execution_device)
        return Conditioning(embeds, None, mask)

    def _kwargs(self, settings: Any, cond: Conditioning, uncond: Conditioning, seeds: list[int],
                step_end: StepEnd, per_prompt: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt_embeds": cond.embeds, "prompt_attention_mask": cond.mask, "num_inference_steps": settings.steps,
            "guidance_scale": settings.cfg, "num_images_per_prompt": per_prompt, "output_type": "latent",
            "max_sequence_length": SEQUENCE, "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
            "callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
        if settings.cfg > 1:
            kwargs.update(negative_prompt_embeds=uncond.embeds, negative_prompt_attention_mask=uncond.mask)
        return kwargs

    def _init_pipelines(self) -> tuple[type, type]:
        return ChromaImg2ImgPipeline, ChromaInpaintPipeline

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
        """Packed latents (B, tokens, 4·C) are unpacked to (B, C, h, w) first."""
        pipe = self.model.pipe
        if latents.dim() == 3:
            latents = ChromaPipeline._unpack_latents(latents, size[1], size[0], pipe.vae_scale_factor)
        return decode(pipe, latents)
