"""DiT families lorakit loads from diffusers folders (Chroma, Qwen-Image), as model modules of
``loading.dit_families``: the pipeline class ``model_index.json`` names (``Family.pipelines``) loads the folder
offline; single files of them are not read (a Chroma or Qwen-Image checkpoint needs its diffusers folder).

What a real folder needs: every component its pipeline lists — Chroma: ``tokenizer/`` (T5), ``text_encoder/``
(T5-XXL), ``transformer/``, ``vae/``, ``scheduler/``; Qwen-Image: ``tokenizer/`` (Qwen2Tokenizer),
``text_encoder/`` (Qwen2.5-VL), ``transformer/``, ``vae/`` (``AutoencoderKLQwenImage``), ``scheduler/``."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError

from ..keymap.families import CHROMA as CHROMA_FAMILY
from ..keymap.families import QWEN_IMAGE as QWEN_FAMILY
from ..keymap.families import Family


class FolderDiT:
    """One family's model module: ``ARCHES``, ``HALF`` (bf16: these DiTs' activations overflow fp16), and the
    folder/file tests and loaders ``loading`` asks every DiT family."""

    HALF = torch.bfloat16

    def __init__(self, family: Family) -> None:
        assert family.arch is not None
        self.family, self.arch = family, family.arch
        self.ARCHES = (family.arch,)

    def is_index(self, index: Mapping[str, Any]) -> bool:
        return str(index.get("_class_name", "")) in self.family.pipelines

    def is_file(self, sd: Mapping[str, Any]) -> bool:
        return False  # no single-file loader: their checkpoints are loaded as diffusers folders

    def load_folder(self, path: Path, dtype: torch.dtype) -> Any:
        import diffusers

        from ..files.inputs import read_json

        try:
            index = read_json(path / "model_index.json")
        except ValueError as e:
            raise ModelError(f"{path / 'model_index.json'}: unreadable ({str(e)[:200]})") from None
        name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
        try:
            return getattr(diffusers, name).from_pretrained(str(path), local_files_only=True, dtype=dtype)
        except Exception as e:  # diffusers raises many types for a broken folder
            raise ModelError(f"{path}: could not load the {name} model ({type(e).__name__}: {str(e)[:200]})") \
                from None

    def load_single_file(self, path: Path, *args: Any) -> Any:
        raise ModelError(f"{path}: {self.family.display} single files are not read; use its diffusers folder")

    def arch_of(self, pipe: Any) -> str:
        return str(self.arch)

    def variant(self, pipe: Any) -> str:
        return str(self.arch)


CHROMA = FolderDiT(CHROMA_FAMILY)
QWEN_IMAGE = FolderDiT(QWEN_FAMILY)

