"""How a model family generates — its defaults and samplers, prompt encoding, sampling (txt2img and from an init
image), decoding and infotext — behind one interface, so the ``Generator`` drives any family the same way
(LoRA schedules, progress, interrupt, mixed-LoRA batches, NaN checks stay in one place).

A family is one class here (``sd_family.SD``, ``flux_family.Flux``, ``sd3_family.SD3``) and one line of
``family_for``'s list; its key tables live in ``keymap`` and its loading in ``models``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..keymap.arch import SD3_SIZES, Arch
from ..library import EmbeddingIndex
from ..lora_model import LoraModel
from ..models.loading import BaseModel
from .conditioning import Conditioning
from .request import Rules

StepEnd = Callable[..., dict[str, Any]]  # diffusers' callback_on_step_end


class PipelineFamily:
    """The generation side of one model family (subclasses implement every method)."""

    rules: Rules

    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        self.model = model
        self.embeddings = embeddings

    @property
    def clip_layers(self) -> int:
        """The first text encoder's layer count (the deepest clip skip)."""
        return int(self.model.pipe.text_encoder.config.num_hidden_layers)

    def prepare(self, text: str, negative: str, loras: list[LoraModel]) -> None:
        """Before encoding: look up what the prompts need (SD: textual-inversion embeddings)."""

    def encode(self, text: str, negative: str, settings: Any) -> tuple[Conditioning, Conditioning]:
        raise NotImplementedError

    def step_embeds(self, cond: Conditioning, uncond: Conditioning, settings: Any) -> torch.Tensor | None:
        """The ``prompt_embeds`` a step callback sets after a text-encoder strength moved (``None``: the family's
        pipeline cannot take new ones mid-run)."""
        return None

    def set_scheduler(self, settings: Any) -> None:
        raise NotImplementedError

    def sample(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
               seeds: list[int], step_end: StepEnd, per_prompt: int = 1, control: Any = None) -> torch.Tensor:
        """The latents after the last step; ``control``: a control image (FLUX.1 control LoRAs)."""
        raise NotImplementedError

    def sample_init(self, settings: Any, size: tuple[int, int], cond: Conditioning, uncond: Conditioning,
                    seeds: list[int], step_end: StepEnd, init: Any, prepared: Any, per_prompt: int = 1
                    ) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
        raise NotImplementedError

    def infotext_params(self, settings: Any) -> dict[str, Any]:
        """Family-specific infotext fields (``Distilled CFG Scale`` on FLUX)."""
        return {}


def family_for(model: BaseModel, embeddings: EmbeddingIndex | None = None) -> PipelineFamily:
    from .chroma_family import Chroma
    from .flux_family import Flux
    from .qwen_family import QwenImage
    from .sd3_family import SD3
    from .sd_family import SD

    adapters: list[tuple[tuple[str, ...], type[PipelineFamily]]] = [
        ((Arch.FLUX1,), Flux), (SD3_SIZES, SD3), ((Arch.CHROMA,), Chroma), ((Arch.QWEN_IMAGE,), QwenImage)]
    cls = next((c for arches, c in adapters if model.arch in arches), SD)
    return cls(model, embeddings)
