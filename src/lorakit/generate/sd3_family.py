"""SD3 / SD3.5 (Medium, Large): CLIP-L + CLIP-G + T5 conditioning through ``StableDiffusion3Pipeline.encode_prompt``,
real CFG (the negative prompt is read whenever ``cfg`` > 1, one batched pass of both per step), the flow-matching
Euler sampler of the model's own scheduler config (shift 3.0 in SAI's folders), img2img / inpainting through
diffusers' SD3 img2img / inpaint pipelines built on the same modules.

Defaults per size, from the model cards: SD3-Medium 28 steps at CFG 7, SD3.5-Large 28 at 3.5, SD3.5-Medium 40 at
4.5. Prompts as on FLUX.1: A1111 emphasis is read as its plain text (``BREAK`` a space); textual-inversion
embeddings and clip skip do not apply. Text-encoder LoRA strengths that move per step re-encode nothing mid-run
(the pipeline's pooled embedding cannot be replaced with the sequence's): they hold the first step's value.
"""
from __future__ import annotations

from typing import Any

import torch

from ..keymap.arch import Arch
from ..library import EmbeddingIndex
from ..models.loading import BaseModel
from .conditioning import Conditioning
from .decode import decode
from .dit_family import DiffusersDiT
from .family import StepEnd
from .flux_family import plain_text
from .request import Rules

SEQUENCE = 256  # T5 tokens read (diffusers' default for SD3; at most 512)
DEFAULTS: dict[str, dict[str, Any]] = {
    Arch.SD3_MEDIUM: {"steps": 28, "cfg": 7.0, "sampler": "Euler"},
    Arch.SD35_LARGE: {"steps": 28, "cfg": 3.5, "sampler": "Euler"},
    Arch.SD35_MEDIUM: {"steps": 40, "cfg": 4.5, "sampler": "Euler"},
}


class SD3(DiffusersDiT):
    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        super().__init__(model, embeddings)
        pipe = model.pipe
        step = int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)
        table = pipe.transformer.config.get("pos_embed_max_size")  # latent patches a side (SD3-Medium: 192)
        self.rules = Rules(defaults=dict(DEFAULTS.get(model.variant, DEFAULTS[Arch.SD3_MEDIUM])), samplers=("Euler",),
                           fast_loras=False, clip_skip=False, size_step=step, family="Stable Diffusion 3",
                           max_size=int(table) * step if table else None)

    def encode(self, text: str, negative: str, settings: Any) -> tuple[Conditioning, Conditioning]:
        cond = self._encode(text)
        return cond, (self._encode(negative) if settings.cfg > 1 else cond)

    def _encode(self, text: str) -> Conditioning:
        pipe = self.model.pipe
        plain = plain_text(text)
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=plain, prompt_2=plain, prompt_3=plain,
                                                      device=pipe._execution_device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=SEQUENCE)
        return Conditioning(embeds, pooled)

    def _kwargs(self, settings: Any, cond: Conditioning, uncond: Conditioning, seeds: list[int],
                step_end: StepEnd, per_prompt: int) -> dict[str, Any]:
        return {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled,
                "negative_prompt_embeds": uncond.embeds, "negative_pooled_prompt_embeds": uncond.pooled,
                "guidance_scale": settings.cfg, "num_inference_steps": settings.steps,
                "num_images_per_prompt": per_prompt, "output_type": "latent", "max_sequence_length": SEQUENCE,
                "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
                "callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents"]}

    def _init_pipelines(self) -> tuple[type, type]:
        from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

        return StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
        return decode(self.model.pipe, latents)
