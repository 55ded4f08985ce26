"""The prompt side of a generation: the model's text encoders, the textual-inversion embeddings a prompt uses
(from the embedding folders and bundled in its LoRAs), and A1111 prompt encoding (``conditioning``)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..library import EmbeddingIndex, bundled_embeddings
from ..library.embeddings import Embedding
from ..lora_model import LoraModel
from ..models.loading import BaseModel
from .conditioning import Conditioning, encode_pair

log = logging.getLogger("lorakit")


class Conditioner:
    def __init__(self, model: BaseModel, embeddings: EmbeddingIndex | None = None) -> None:
        self.model = model
        self.embeddings = embeddings
        self.used: dict[str, Embedding] = {}

    @property
    def encoders(self) -> list[tuple[torch.nn.Module, Any]]:
        pipe = self.model.pipe
        pairs = [(pipe.text_encoder, pipe.tokenizer)]
        if self.model.sdxl:
            pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
        return pairs

    @property
    def layers(self) -> int:
        """The first text encoder's layer count: the deepest clip skip."""
        return int(self.model.pipe.text_encoder.config.num_hidden_layers)

    def prepare(self, text: str, negative: str, loras: list[LoraModel]) -> None:
        """Find the embeddings named in the prompts, or bundled in the prompt's LoRAs (kept for ``encode``)."""
        found = self.embeddings.used_in(text + "\n" + negative) if self.embeddings else {}
        for lora in loras:
            found.update(bundled_embeddings(lora.embeddings, lora.path))
        for name in found:
            log.info(f"embedding {name} ({found[name].path}): {found[name].tokens} token(s)")
        self.used = found

    def encode(self, text: str, negative: str, clip_skip: int) -> tuple[Conditioning, Conditioning]:
        """(positive, negative) conditionings with the same number of 77-token chunks."""
        return encode_pair(text, negative, self.encoders, clip_skip, self.model.sdxl, self.used)
