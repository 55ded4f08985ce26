"""What the diffusion-transformer families (FLUX.1, SD3, Chroma, Qwen-Image) share: a diffusers pipeline whose
img2img and inpainting siblings take the same keyword arguments as it (``_kwargs``), so sampling, sampling from an
init image, the scheduler and their refusals are written once. A family gives its ``Rules`` (whose ``family``
names it in messages), its arguments and its two init-image pipelines; FLUX.1 adds control images
(``flux_family``), Qwen-Image its own latent encoding."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import LorakitError
from ..library import EmbeddingIndex
from ..models.loading import BaseModel
from .conditioning import Conditioning
from .family import PipelineFamily, StepEnd
from .img2img import derived_pipeline, encoded_init
from .init_image import steps_run


class DiffusersDiT(PipelineFamily):
    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        super().__init__(model, embeddings)
        self.scheduler = model.pipe.scheduler  # the model's own flow-matching config (shift, dynamic shifting)

    @property
    def label(self) -> str:
        """The family's name in messages (its ``Rules.family``: "Chroma")."""
        return self.rules.family

    def set_scheduler(self, settings: Any) -> None:
        """One sampler: the model's own scheduler; for a single step without its terminal stretch
        (``shift_terminal``, Qwen-Image's 0.02: stretching a one-sigma schedule divides 0 by 0, so every run of
        ``--steps 1`` ended in NaN latents, blamed on the LoRAs)."""
        one_step = settings.steps == 1 and getattr(self.scheduler.config, "shift_terminal", None)
        self.model.pipe.scheduler = type(self.scheduler).from_config(self.scheduler.config, shift_terminal=None) \
            if one_step else self.scheduler

    def _kwargs(self, settings: Any, cond: Conditioning, uncond: Conditioning, seeds: list[int],
                step_end: StepEnd, per_prompt: int) -> dict[str, Any]:
        """The pipeline call's arguments (conditioning, steps, guidance, generators, the step callback)."""
        raise NotImplementedError

    def _init_pipelines(self) -> tuple[type, type]:
        """The (img2img, inpainting) pipeline classes built from the model's components."""
        raise NotImplementedError

    def _encoded_init(self, prepared: Any, count: int) -> torch.Tensor:
        """The init image's latents ``count`` times (an img2img run of no steps returns them)."""
        return encoded_init(self.model, prepared, count)

    def _check_init(self) -> None:
        """Raise when the model as patched cannot start from an init image."""

    def sample(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
               seeds: list[int], step_end: StepEnd, per_prompt: int = 1, control: Any = None) -> torch.Tensor:
        if control is not None:
            raise LorakitError(f"a control image is for FLUX.1 control LoRAs (Canny, Depth); this is a {self.label} "
                               "model")
        kwargs = self._kwargs(settings, cond, uncond, seeds, step_end, per_prompt)
        with torch.no_grad():
            return self.model.pipe(width=size[0], height=size[1], **kwargs).images  # type: ignore[no-any-return]

    def sample_init(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
                    seeds: list[int], step_end: StepEnd, init: Any, prepared: Any, per_prompt: int = 1
                    ) -> torch.Tensor:
        if steps_run(settings.steps, init.strength) == 0:
            return self._encoded_init(prepared, len(seeds))
        if prepared.mask is not None and init.fill in (2, 3):
            raise LorakitError(f"the latent noise / latent nothing fills (2, 3) are not available on {self.label}; "
                               "use fill 0 (fill) or 1 (original)")
        self._check_init()
        img2img, inpaint = self._init_pipelines()
        pipe = derived_pipeline(self.model.pipe, inpaint if prepared.mask is not None else img2img)
        kwargs = self._kwargs(settings, cond, uncond, seeds, step_end, per_prompt)
        kwargs.update(image=prepared.image, strength=init.strength, width=size[0], height=size[1])
        if prepared.mask is not None:
            kwargs["mask_image"] = prepared.mask
        with torch.no_grad():
            return pipe(**kwargs).images  # type: ignore[no-any-return]
