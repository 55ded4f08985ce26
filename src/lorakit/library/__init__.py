"""Folders of LoRA files and embeddings: finding them by the names a prompt uses. Importing it needs no torch."""
from .embeddings import Embedding, EmbeddingIndex, bundled_embeddings
from .names import LoraIndex, LoraNameError, lora_dirs_from_env

__all__ = ["LoraIndex", "LoraNameError", "lora_dirs_from_env", "Embedding", "EmbeddingIndex", "bundled_embeddings"]
