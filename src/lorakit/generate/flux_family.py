"""FLUX.1 (dev, schnell): T5 + CLIP-L conditioning, the flow-matching Euler sampler of the model's own scheduler
config, the distilled guidance (dev: ``guidance``, default 3.5; schnell has none), true CFG only when asked
(``cfg`` > 1 with a negative prompt, as Forge: twice the cost), packed latents.

Control LoRAs (Canny, Depth): the LoRA widens the transformer's input (``patch/expand.py``) and a control image
(edges, a depth map: preprocessed by the user) goes through diffusers' ``FluxControlPipeline``.

Prompts: A1111 emphasis is not applied on FLUX — ``(word:1.2)`` and ``[word]`` are read as their plain text and
``BREAK`` as a space (T5 has no 75-token chunks and no weighting that means what A1111's does); textual-inversion
embeddings and clip skip do not apply.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxControlPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

from ..errors import LorakitError
from ..library import EmbeddingIndex
from ..models.loading import BaseModel
from .conditioning import Conditioning
from .decode import decode
from .dit_family import DiffusersDiT
from .emphasis import BREAK, parse_emphasis
from .family import StepEnd
from .img2img import derived_pipeline
from .request import Rules

SEQUENCE = {"flux-1-schnell": 256}  # T5 tokens read (dev: 512, as the models were trained)
DEV = {"steps": 28, "cfg": 1.0, "sampler": "Euler", "guidance": 3.5}
SCHNELL = {"steps": 4, "cfg": 1.0, "sampler": "Euler"}


def plain_text(prompt: str) -> str:
    """A1111 emphasis syntax removed: the text FLUX reads."""
    return " ".join(p.strip() for p in (t for t, w in parse_emphasis(prompt) if (t, w) != BREAK) if p.strip())


class Flux(DiffusersDiT):
    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        super().__init__(model, embeddings)
        self.variant = model.variant
        self.guided = bool(model.pipe.transformer.config.guidance_embeds)
        self.rules = Rules(defaults=dict(DEV if self.guided else SCHNELL), samplers=("Euler",), fast_loras=False,
                           clip_skip=False, size_step=2 * int(model.pipe.vae_scale_factor), family="FLUX.1")
        self.sequence = SEQUENCE.get(self.variant, 512)

    def encode(self, text: str, negative: str, settings: Any) -> tuple[Conditioning, Conditioning]:
        cond = self._encode(text)
        return cond, (self._encode(negative) if settings.cfg > 1 else cond)

    def _encode(self, text: str) -> Conditioning:
        pipe = self.model.pipe
        plain = plain_text(text)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompt=plain, prompt_2=plain, device=pipe._execution_device,
                                                   max_sequence_length=self.sequence)
        return Conditioning(embeds, pooled)

    def _kwargs(self, settings: Any, cond: Conditioning, uncond: Conditioning, seeds: list[int],
                step_end: StepEnd, per_prompt: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled, "num_inference_steps": settings.steps,
            "guidance_scale": settings.guidance if settings.guidance is not None else 0.0,
            "num_images_per_prompt": per_prompt, "output_type": "latent", "max_sequence_length": self.sequence,
            "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
            "callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
        if settings.cfg > 1:  # true CFG (Forge's "CFG scale" on FLUX): the negative prompt, a second pass per step
            kwargs.update(true_cfg_scale=settings.cfg, negative_prompt_embeds=uncond.embeds,
                          negative_pooled_prompt_embeds=uncond.pooled)
        return kwargs

    def sample(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
               seeds: list[int], step_end: StepEnd, per_prompt: int = 1, control: Any = None) -> torch.Tensor:
        kwargs = self._kwargs(settings, cond, uncond, seeds, step_end, per_prompt)
        pipe = self.model.pipe
        if self._widened() != (control is not None):
            raise LorakitError("a FLUX.1 control LoRA (Canny, Depth) needs a control image (--control-image)"
                               if control is None else "a control image needs a FLUX.1 control LoRA (Canny, "
                               "Depth) in the prompt")
        if control is not None:
            pipe = derived_pipeline(pipe, FluxControlPipeline)
            kwargs["control_image"] = control
        with torch.no_grad():
            return pipe(width=size[0], height=size[1], **kwargs).images  # type: ignore[no-any-return]

    def _widened(self) -> bool:
        """Whether a control LoRA widened the transformer's input to take a control image's latents too."""
        pipe = self.model.pipe
        return int(pipe.transformer.config.in_channels) > 4 * int(pipe.vae.config.latent_channels)

    def _init_pipelines(self) -> tuple[type, type]:
        return FluxImg2ImgPipeline, FluxInpaintPipeline

    def _check_init(self) -> None:
        if self._widened():
            raise LorakitError("a FLUX.1 control LoRA generates from a control image, not from an init image")

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
        """Packed latents (B, tokens, 4·C) are unpacked to (B, C, h, w) first."""
        pipe = self.model.pipe
        if latents.dim() == 3:
            latents = FluxPipeline._unpack_latents(latents, size[1], size[0], pipe.vae_scale_factor)
        return decode(pipe, latents)

    def infotext_params(self, settings: Any) -> dict[str, Any]:
        return {"Distilled CFG Scale": settings.guidance} if settings.guidance is not None else {}
