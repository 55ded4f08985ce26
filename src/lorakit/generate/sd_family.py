"""Stable Diffusion 1.x / 2.x / XL (and the demo model): A1111 prompt encoding (chunks, emphasis, BREAK, clip skip,
embeddings), A1111 sampler names, CFG."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import LorakitError
from ..library import EmbeddingIndex
from ..lora_model import LoraModel
from ..models.loading import BaseModel
from .conditioner import Conditioner
from .conditioning import Conditioning
from .decode import decode
from .family import PipelineFamily, StepEnd
from .img2img import sample_init
from .request import SD_RULES
from .samplers import scheduler_for
from .sampling import sample


class SD(PipelineFamily):
    rules = SD_RULES

    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        super().__init__(model, embeddings)
        self.conditioner = Conditioner(model, embeddings)
        # The model's own scheduler says what its UNet predicts (SD2-768 models predict v, not the noise).
        self.prediction_type = str(model.pipe.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def clip_layers(self) -> int:
        return self.conditioner.layers

    def prepare(self, text: str, negative: str, loras: list[LoraModel]) -> None:
        self.conditioner.prepare(text, negative, loras)

    def encode(self, text: str, negative: str, settings: Any) -> tuple[Conditioning, Conditioning]:
        return self.conditioner.encode(text, negative, settings.clip_skip)

    def step_embeds(self, cond: Conditioning, uncond: Conditioning, settings: Any) -> torch.Tensor | None:
        return torch.cat([uncond.embeds, cond.embeds]) if settings.cfg > 1 else cond.embeds

    def set_scheduler(self, settings: Any) -> None:
        self.model.pipe.scheduler = scheduler_for(settings.sampler, self.prediction_type)

    def sample(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
               seeds: list[int], step_end: StepEnd, per_prompt: int = 1, control: Any = None) -> torch.Tensor:
        if control is not None:
            raise LorakitError("a control image is for FLUX.1 control LoRAs (Canny, Depth); this is a Stable "
                               "Diffusion model")
        return sample(self.model, settings, size, cond, uncond, seeds, step_end, per_prompt)

    def sample_init(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
                    seeds: list[int], step_end: StepEnd, init: Any, prepared: Any, per_prompt: int = 1
                    ) -> torch.Tensor:
        return sample_init(self.model, settings, size, cond, uncond, seeds, step_end, init, prepared,
                           per_prompt=per_prompt)

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
        return decode(self.model.pipe, latents)
