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

from ..errors import LorakitError
from ..keymap.arch import Arch
from ..library import EmbeddingIndex
from ..models.loading import BaseModel
from .conditioning import Conditioning
from .decode import decode
from .family import PipelineFamily, StepEnd
from .flux_family import plain_text
from .img2img import derived_pipeline, encoded_init
from .init_image import steps_run
from .request import Rules

SEQUENCE = 256  # T5 tokens read (diffusers' default for SD3; at most 512)
DEFAULTS: dict[str, dict[str, Any]] = {
    Arch.SD3_MEDIUM: {"steps": 28, "cfg": 7.0, "sampler": "Euler"},
    Arch.SD35_LARGE: {"steps": 28, "cfg": 3.5, "sampler": "Euler"},
    Arch.SD35_MEDIUM: {"steps": 40, "cfg": 4.5, "sampler": "Euler"},
}


class SD3(PipelineFamily):
    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        super().__init__(model, embeddings)
        pipe = model.pipe
        step = int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)
        self.rules = Rules(defaults=dict(DEFAULTS.get(model.variant, DEFAULTS[Arch.SD3_MEDIUM])), samplers=("Euler",),
                           fast_loras=False, clip_skip=False, size_step=step, family="Stable Diffusion 3")
        self.scheduler = pipe.scheduler  # the model's own flow-matching config (shift 3.0)

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

    def set_scheduler(self, settings: Any) -> None:
        self.model.pipe.scheduler = self.scheduler

    def _kwargs(self, settings: Any, cond: Conditioning, uncond: Conditioning, seeds: list[int],
                step_end: StepEnd, per_prompt: int) -> dict[str, Any]:
        return {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled,
                "negative_prompt_embeds": uncond.embeds, "negative_pooled_prompt_embeds": uncond.pooled,
                "guidance_scale": settings.cfg, "num_inference_steps": settings.steps,
                "num_images_per_prompt": per_prompt, "output_type": "latent", "max_sequence_length": SEQUENCE,
                "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
                "callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents"]}

    def sample(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
               seeds: list[int], step_end: StepEnd, per_prompt: int = 1, control: Any = None) -> torch.Tensor:
        if control is not None:
            raise LorakitError("a control image is for FLUX.1 control LoRAs (Canny, Depth); this is a Stable "
                               "Diffusion 3 model")
        kwargs = self._kwargs(settings, cond, uncond, seeds, step_end, per_prompt)
        with torch.no_grad():
            return self.model.pipe(width=size[0], height=size[1], **kwargs).images  # type: ignore[no-any-return]

    def sample_init(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
                    seeds: list[int], step_end: StepEnd, init: Any, prepared: Any, per_prompt: int = 1
                    ) -> torch.Tensor:
        from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

        if steps_run(settings.steps, init.strength) == 0:
            return encoded_init(self.model, prepared, len(seeds))
        if prepared.mask is not None and init.fill in (2, 3):
            raise LorakitError("the latent noise / latent nothing fills (2, 3) are not available on Stable "
                               "Diffusion 3; use fill 0 (fill) or 1 (original)")
        masked = prepared.mask is not None
        cls = StableDiffusion3InpaintPipeline if masked else StableDiffusion3Img2ImgPipeline
        pipe = derived_pipeline(self.model.pipe, cls)
        kwargs = self._kwargs(settings, cond, uncond, seeds, step_end, per_prompt)
        kwargs.update(image=prepared.image, strength=init.strength, width=size[0], height=size[1])
        if masked:
            kwargs["mask_image"] = prepared.mask
        with torch.no_grad():
            return pipe(**kwargs).images  # type: ignore[no-any-return]

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
        return decode(self.model.pipe, latents)
