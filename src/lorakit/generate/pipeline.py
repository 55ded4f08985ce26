"""Generation with LoRAs from the prompt: the ``Generator`` drives diffusers pipelines (the only class that does).

Per request: resolve it into a ``Job`` (``request``), make its LoRAs active (``schedule``: fused, or hooks when a
strength changes per step), encode the prompts the A1111 way (``conditioner``), sample with every step's latents
checked for NaN/inf, decode (``decode``: fp32 retry for an overflowing half VAE) and write A1111 infotext
(``infotext``). LoRAs stay applied between requests so the next one switches only what changes; ``close()``
restores the model, and any error restores it before it propagates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..library import EmbeddingIndex, Library
from ..models.loading import BaseModel
from ..patch import patcher_for
from .conditioner import Conditioner
from .decode import check_latents, decode
from .infotext import job_infotext
from .request import DEFAULTS, LIMITS, Job, Request, Settings, resolve_job
from .samplers import scheduler_for
from .schedule import LoraSchedule

__all__ = ["DEFAULTS", "LIMITS", "Generator", "Job", "Request", "Result", "Settings"]
log = logging.getLogger("lorakit")


@dataclass
class Result:
    images: list[Any]
    seeds: list[int]
    infotexts: list[str]
    notes: list[str] = field(default_factory=list)
    prompt: str = ""  # the prompt as used (with added trigger words)
    settings: dict[str, Any] = field(default_factory=dict)  # steps, cfg, sampler, clip_skip as used


class Generator:
    def __init__(self, model: BaseModel, loras: Library, embeddings: EmbeddingIndex | None = None) -> None:
        self.model = model
        self.index = loras
        self.conditioner = Conditioner(model, embeddings)
        self.patcher = patcher_for(model.pipe)
        self.on_step: Callable[[int, int], None] | None = None  # (step done, steps): progress reports
        # The model's own scheduler says what its UNet predicts (SD2-768 models predict v, not the noise).
        self.prediction_type = str(model.pipe.scheduler.config.get("prediction_type", "epsilon"))

    def close(self) -> None:
        """Put every weight back (bit-exact)."""
        self.patcher.restore()

    def __call__(self, req: Request) -> Result:
        try:
            return self._generate(resolve_job(req, self.index, self.conditioner.layers))
        except BaseException:
            self.patcher.restore()
            raise

    def _generate(self, job: Job) -> Result:
        schedule = LoraSchedule(job.refs, job.loras, job.settings.steps)
        schedule.apply(self.patcher)
        self.conditioner.prepare(job.text, job.negative_text, job.loras)
        cond, uncond = self.conditioner.encode(job.text, job.negative_text, job.settings.clip_skip)
        self.model.pipe.scheduler = scheduler_for(job.settings.sampler, self.prediction_type)
        latents = self._sample(job, cond, uncond, schedule)
        self.model.set_vae_tiling(job.request.width, job.request.height)  # by size and --vram
        images = decode(self.model.pipe, latents)
        hashes = {ref.name: self._short_hash(str(lora.path)) for ref, lora in zip(job.refs, job.loras)}
        texts = [job_infotext(job, self.model, seed, hashes) for seed in job.seeds]
        return Result(images, job.seeds, texts, job.notes, job.prompt, job.settings.as_dict())

    def _sample(self, job: Job, cond: Any, uncond: Any, schedule: LoraSchedule) -> torch.Tensor:
        """The latents after the last step (B, C, h, w). The seed's noise is drawn on the CPU generator (as
        A1111 does by default), so a seed gives comparable images on every device."""
        s, req = job.settings, job.request
        kwargs: dict[str, Any] = dict(
            prompt_embeds=cond.embeds, negative_prompt_embeds=uncond.embeds, num_inference_steps=s.steps,
            guidance_scale=s.cfg, width=req.width, height=req.height, num_images_per_prompt=req.batch,
            generator=[torch.Generator().manual_seed(seed) for seed in job.seeds], output_type="latent",
            callback_on_step_end=self._step_end(job, schedule),
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        if self.model.sdxl:
            kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
        with torch.no_grad():
            return self.model.pipe(**kwargs).images  # type: ignore[no-any-return]

    def _step_end(self, job: Job, schedule: LoraSchedule) -> Callable[..., dict[str, Any]]:
        """After each step: check the latents, report progress, and move scheduled strengths to the next step
        (re-encoding the prompt when a text-encoder strength moved)."""
        steps = job.settings.steps
        with_cfg = job.settings.cfg > 1

        def step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            check_latents(kwargs["latents"], i + 1, steps)
            if self.on_step is not None:
                self.on_step(i + 1, steps)
            if schedule.scheduled and i + 2 <= steps and schedule.advance(self.patcher, i + 2):
                cond, uncond = self.conditioner.encode(job.text, job.negative_text, job.settings.clip_skip)
                kwargs["prompt_embeds"] = torch.cat([uncond.embeds, cond.embeds]) if with_cfg else cond.embeds
            return kwargs

        return step_end

    def _short_hash(self, path: str) -> str:
        """A1111's short hash, computed once per file version and kept in the library's index."""
        return str(self.index.hashes(self.index.entry(path))["a1111_short"])
