"""Folders of LoRA files and embeddings: the indexed library, names a prompt uses, metadata. Importing it (and
scanning safetensors files) needs no torch."""
from .embeddings import Embedding, EmbeddingIndex, bundled_embeddings
from .library import Library, LoraEntry
from .names import LoraNameError, lora_dirs_from_env

LoraIndex = Library  # the name used before the library had an index

__all__ = ["Library", "LoraEntry", "LoraIndex", "LoraNameError", "lora_dirs_from_env", "Embedding",
           "EmbeddingIndex", "bundled_embeddings"]
