"""Generation with LoRAs from the prompt: the ``Generator`` drives diffusers pipelines (the only class that does).

Per request: resolve it into a ``Job`` (``request``), make its LoRAs active (``schedule``: fused, or hooks when a
strength changes per step), encode the prompts the A1111 way (``conditioner``), sample with every step's latents
checked for NaN/inf, decode (``decode``: fp32 retry for an overflowing half VAE) and write A1111 infotext
(``infotext``). LoRAs stay applied between requests so the next one switches only what changes; ``close()``
restores the model, and any error restores it before it propagates.

``run_batch``: several requests, those that can share a UNet batch sampled together each with its own LoRA set
(``batched``; per-sample hooks of ``patch.multi``, no weight changes).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LorakitError
from ..library import EmbeddingIndex, Library
from ..models.loading import BaseModel
from ..patch import patcher_for
from ..patch.multi import MultiPatcher
from .batched import DEFAULT_MAX_IMAGES, by_length, group_jobs, part_specs
from .conditioning import Conditioning
from .decode import check_latents
from .family import PipelineFamily, family_for
from .infotext import job_infotext
from .init_image import paste_back, prepare
from .request import DEFAULTS, LIMITS, Job, Request, Settings, resolve_job
from .sampling import stack
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
        self.family: PipelineFamily = family_for(model, embeddings)  # how this model's family generates
        self.patcher = patcher_for(model.pipe)
        self.multi = MultiPatcher(self.patcher.components)  # per-sample LoRA sets of mixed batches
        self.lora_mode = "fused"  # how a request's unscheduled LoRAs are applied ("hooks": no weight changes)
        self.on_step: Callable[[int, int], None] | None = None  # (step done, steps): progress reports
        # "skip" (end the running request) or "interrupt" (end it and what follows): set from another thread,
        # acted on between steps; the caller clears "interrupt" when its job ends (``server.worker``).
        self.stopping: str | None = None
        self._stopped = False

    @property
    def conditioner(self) -> Any:
        """Stable Diffusion's prompt encoder (A1111 chunks, emphasis, embeddings); ``None`` for other families."""
        return getattr(self.family, "conditioner", None)

    def resolve(self, req: Request) -> Job:
        """``req`` checked and resolved for this model (its family's defaults and limits); nothing changes yet."""
        return resolve_job(req, self.index, self.family.clip_layers, self.model.native_size, self.family.rules)

    def close(self) -> None:
        """Put every weight back (bit-exact)."""
        self.patcher.restore()

    def __call__(self, req: Request) -> Result:
        try:
            result = self._generate(self.resolve(req))
        except BaseException:
            self.patcher.restore()
            raise
        finally:
            self._after_run()
        return result

    def _after_run(self) -> None:
        """A run ended early by skip/interrupt leaves the model as loaded (bit-exact); a skip ends only one run."""
        if self._stopped:
            self.patcher.restore()
        self._stopped = False
        if self.stopping == "skip":
            self.stopping = None

    def run_batch(self, requests: Sequence[Request], max_images: int = DEFAULT_MAX_IMAGES
                  ) -> list[Result | LorakitError]:
        """Each request's result, or the ``LorakitError`` that stopped it (the others go on). Requests that can
        share a UNet batch (``batched.batch_key``, same number of prompt chunks) sample together, up to
        ``max_images`` images, each with its own LoRA set (no weight changes); the rest run one by one. Each image
        equals the request's image alone in hooks mode up to a larger batch's rounding."""
        out: dict[int, Result | LorakitError] = {}
        jobs: list[Job | None] = []
        for i, req in enumerate(requests):
            try:
                jobs.append(self.resolve(req))
            except LorakitError as e:  # checked before any weight changes
                jobs.append(None)
                out[i] = e
        for group in group_jobs(jobs, max_images):
            out.update(zip(group, self._run_group([job for i in group if (job := jobs[i]) is not None])))
        return [out[i] for i in range(len(requests))]

    def _run_group(self, jobs: list[Job]) -> Sequence[Result | LorakitError]:
        if len(jobs) > 1:
            try:
                results = self._generate_mixed(jobs)
                for result in results[1:] if self._stopped else []:  # the note went to the first job
                    result.notes.extend(n for n in results[0].notes if n not in result.notes)
                return results
            except LorakitError as e:  # e.g. NaN in one sample: alone, only that request fails
                self.patcher.restore()
                log.warning(f"a mixed batch of {len(jobs)} requests failed ({e}); running them one by one")
            except BaseException:
                self.patcher.restore()
                raise
            finally:
                self._after_run()
        return [self._alone(job) for job in jobs]

    def _alone(self, job: Job) -> Result | LorakitError:
        try:
            return self._generate(job)
        except LorakitError as e:
            self.patcher.restore()
            return e
        except BaseException:
            self.patcher.restore()
            raise
        finally:
            self._after_run()

    def _generate_mixed(self, jobs: list[Job]) -> list[Result]:
        """``jobs`` (one ``batch_key``) sampled in as few UNet batches as their prompt lengths allow."""
        self.patcher.restore()  # the shared base weights, unpatched
        pairs = [self._encode_alone(job) for job in jobs]
        self.patcher.restore()
        results: dict[int, Result] = {}
        for part in by_length([cond.embeds.shape[1] for cond, _ in pairs]):
            batch = [jobs[i] for i in part]
            latents = self._sample_mixed(batch, [pairs[i][0] for i in part], [pairs[i][1] for i in part])
            ends = list(itertools.accumulate(job.request.batch for job in batch))
            for i, job, end in zip(part, batch, ends):
                results[i] = self._result(job, latents[end - job.request.batch:end])
        return [results[i] for i in range(len(jobs))]

    def _encode_alone(self, job: Job) -> tuple[Conditioning, Conditioning]:
        """The job's prompts encoded with its own text-encoder LoRAs (hooks; the UNet's part off)."""
        self.patcher.set(part_specs(job, "te"), mode="hooks", log_reports=False)
        self.family.prepare(job.text, job.negative_text, job.loras)
        return self.family.encode(job.text, job.negative_text, job.settings)

    def _sample_mixed(self, jobs: list[Job], conds: list[Conditioning], unconds: list[Conditioning]
                      ) -> torch.Tensor:
        counts = [job.request.batch for job in jobs]
        samples = [k for k, n in enumerate(counts) for _ in range(n)]
        first = jobs[0]
        log.info(f"mixed-LoRA batch: {len(jobs)} requests, {len(samples)} images in one UNet batch")
        self.family.set_scheduler(first.settings)
        with self.multi:
            self.multi.set([part_specs(job, "unet") for job in jobs], samples)
            return self.family.sample(first.settings, (first.width, first.height), stack(conds, counts),
                                      stack(unconds, counts), [s for job in jobs for s in job.seeds],
                                      self._step_end(first, LoraSchedule([], [], first.settings.steps)))

    def _generate(self, job: Job) -> Result:
        schedule = LoraSchedule(job.refs, job.loras, job.steps_run)
        schedule.apply(self.patcher, self.lora_mode)
        self.family.prepare(job.text, job.negative_text, job.loras)
        cond, uncond = self.family.encode(job.text, job.negative_text, job.settings)
        self.family.set_scheduler(job.settings)
        return self._result(job, self._sample(job, cond, uncond, schedule))

    def _result(self, job: Job, latents: torch.Tensor) -> Result:
        """Decode the job's latents (its images together, as alone) and describe them."""
        self.model.set_vae_tiling(job.width, job.height)  # by size and --vram
        images = self.family.decode(latents, (job.width, job.height))
        if job.request.init is not None:
            images = paste_back(images, self._prepared(job))
        hashes = {ref.name: self._short_hash(str(lora.path)) for ref, lora in zip(job.refs, job.loras)}
        extra = self.family.infotext_params(job.settings)
        texts = [job_infotext(job, self.model, seed, hashes, extra) for seed in job.seeds]
        return Result(images, job.seeds, texts, job.notes, job.prompt, job.settings.as_dict())

    def _sample(self, job: Job, cond: Any, uncond: Any, schedule: LoraSchedule) -> torch.Tensor:
        """The latents after the last step (B, C, h, w) (``sampling.sample``)."""
        req, size = job.request, (job.width, job.height)
        if req.init is not None:
            return self.family.sample_init(job.settings, size, cond, uncond, job.seeds, self._step_end(job, schedule),
                                           req.init, self._prepared(job), per_prompt=req.batch)
        return self.family.sample(job.settings, size, cond, uncond, job.seeds, self._step_end(job, schedule),
                                  per_prompt=req.batch, control=req.control)

    def _prepared(self, job: Job) -> Any:
        """The job's init image and mask at its size (prepared once per job)."""
        init = job.request.init
        assert init is not None
        if job.prepared is None:
            job.prepared = prepare(init, job.width, job.height)
        return job.prepared

    def _step_end(self, job: Job, schedule: LoraSchedule) -> Callable[..., dict[str, Any]]:
        """After each step: check the latents, report progress, and move scheduled strengths to the next step
        (re-encoding the prompt when a text-encoder strength moved)."""
        steps = job.steps_run

        def step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            check_latents(kwargs["latents"], i + 1, steps)
            if self.on_step is not None:
                self.on_step(i + 1, steps)
            if self.stopping and not self._stopped and i + 1 < steps:
                pipe._interrupt = True  # diffusers skips the remaining steps and returns these latents
                self._stopped = True
                job.notes.append(f"{'skipped' if self.stopping == 'skip' else 'interrupted'} after step {i + 1} "
                                 f"of {steps}")
            if schedule.scheduled and i + 2 <= steps and schedule.advance(self.patcher, i + 2):
                cond, uncond = self.family.encode(job.text, job.negative_text, job.settings)
                embeds = self.family.step_embeds(cond, uncond, job.settings)
                if embeds is not None:
                    kwargs["prompt_embeds"] = embeds
            return kwargs

        return step_end

    def _short_hash(self, path: str) -> str:
        """A1111's short hash, computed once per file version and kept in the library's index."""
        return str(self.index.hashes(self.index.entry(path))["a1111_short"])
