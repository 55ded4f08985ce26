"""Qwen-Image: Qwen2.5-VL conditioning (the pipeline's own chat template, its first 34 tokens dropped), the
flow-matching Euler sampler of the model's scheduler config, **true CFG** (``true_cfg_scale``: the negative prompt
in a second pass per step; Qwen-Image has no distilled guidance), packed latents (2×2 patches) and its 3-D VAE
(``models/qwen.py``).

``cfg`` is the true CFG scale (default 4.0, diffusers' and the model card's); at ``cfg`` ≤ 1 one pass runs and the
negative prompt is not encoded. An empty negative prompt is a single space, as the model card writes it. Prompts:
A1111 emphasis is read as plain text (as on FLUX.1), clip skip and textual-inversion embeddings do not apply.
Prompt embeddings have the prompt's own length; a mixed-LoRA batch pads them and passes the mask.

A real model folder needs what ``QwenImagePipeline`` lists: ``tokenizer/`` (Qwen2Tokenizer), ``text_encoder/``
(Qwen2.5-VL-7B), ``transformer/``, ``vae/`` (``AutoencoderKLQwenImage``) and ``scheduler/``.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline, QwenImagePipeline

from ..library import EmbeddingIndex
from ..models import qwen
from ..models.loading import BaseModel
from .conditioning import Conditioning
from .decode import decode
from .dit_family import DiffusersDiT
from .family import StepEnd
from .flux_family import plain_text
from .request import Rules

DEFAULTS = {"steps": 30, "cfg": 4.0, "sampler": "Euler"}
EMPTY_NEGATIVE = " "  # the model card's negative prompt when there is none


class QwenImage(DiffusersDiT):
    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        super().__init__(model, embeddings)
        self.rules = Rules(defaults=dict(DEFAULTS), samplers=("Euler",), fast_loras=False, clip_skip=False,
                           size_step=2 * int(model.pipe.vae_scale_factor), family="Qwen-Image")

    @property
    def clip_layers(self) -> int:
        return 1  # no clip skip on an LLM encoder

    def encode(self, text: str, negative: str, settings: Any) -> tuple[Conditioning, Conditioning]:
        cond = self._encode(text)
        return cond, (self._encode(negative or EMPTY_NEGATIVE) if settings.cfg > 1 else cond)

    def _encode(self, text: str) -> Conditioning:
        """(1, L, width) embeddings of the prompt (its own length L: no padding, so no mask)."""
        pipe = self.model.pipe
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(prompt=plain_text(text), device=pipe._execution_device)
        return Conditioning(embeds, None, mask)

    def _kwargs(self, settings: Any, cond: Conditioning, uncond: Conditioning, seeds: list[int],
                step_end: StepEnd, per_prompt: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt_embeds": cond.embeds, "prompt_embeds_mask": cond.mask, "num_inference_steps": settings.steps,
            "true_cfg_scale": settings.cfg, "num_images_per_prompt": per_prompt, "output_type": "latent",
            "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
            "callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
        if settings.cfg > 1:  # true CFG: the negative prompt, a second pass per step
            kwargs.update(negative_prompt_embeds=uncond.embeds, negative_prompt_embeds_mask=uncond.mask)
        return kwargs

    def _init_pipelines(self) -> tuple[type, type]:
        return QwenImageImg2ImgPipeline, QwenImageInpaintPipeline

    def _encoded_init(self, prepared: Any, count: int) -> torch.Tensor:
        pixels = self.model.pipe.image_processor.preprocess(prepared.image)[0]
        return qwen.encode(self.model.pipe.vae, pixels).repeat(count, 1, 1, 1)

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
        """Packed latents (B, tokens, 4·C) are unpacked to (B, C, 1, h, w) first."""
        pipe = self.model.pipe
        if latents.dim() == 3:
            latents = QwenImagePipeline._unpack_latents(latents, size[1], size[0], pipe.vae_scale_factor)
        return decode(pipe, latents, qwen.vae_in)
