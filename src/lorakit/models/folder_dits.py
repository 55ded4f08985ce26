"""DiT families lorakit loads as data (Chroma, Qwen-Image), as model modules of ``loading.dit_families``: the
pipeline class ``model_index.json`` names (``Family.pipelines``) loads the folder offline; a single file
(``Family.single_file``: lodestones' BFL-named Chroma checkpoints, ComfyUI's Qwen-Image ones) gives the transformer —
converted by the family's map, fused rows split by the config's hidden width — and the rest comes from a diffusers
folder of the family named by ``components`` (``--components DIR``: tokenizers, text encoders, VAE, scheduler and
the transformer's config), as for FLUX.1 transformer-only files; an all-in-one file's text encoders (and an LDM VAE
where the family's is one) replace the folder's.

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
from .dit_files import build_on_meta, folder_config, replace_encoders, replace_vae, split_original


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
        layout = self.family.single_file
        return layout is not None and layout.claims(sd)

    def load_folder(self, path: Path, dtype: torch.dtype, transformer: bool = True) -> Any:
        """The family's pipeline from a diffusers folder, offline (``transformer=False``: all but the transformer,
        which a single file then gives)."""
        import diffusers

        from ..files.inputs import read_json

        try:
            index = read_json(path / "model_index.json")
        except (OSError, ValueError) as e:
            raise ModelError(f"{path / 'model_index.json'}: unreadable ({str(e)[:200]})") from None
        name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
        if name not in self.family.pipelines:
            raise ModelError(f"{path}: not a {self.family.display} diffusers folder (model_index.json names "
                             f"{name or 'no pipeline'})")
        skip: dict[str, Any] = {} if transformer else {"transformer": None}
        try:
            return getattr(diffusers, name).from_pretrained(str(path), local_files_only=True, dtype=dtype, **skip)
        except Exception as e:  # diffusers raises many types for a broken folder
            raise ModelError(f"{path}: could not load the {name} model ({type(e).__name__}: {str(e)[:200]})") \
                from None

    def load_single_file(self, path: Path, sd: Mapping[str, torch.Tensor], components: Path | None,
                         dtype: torch.dtype, quantized: Any = None) -> Any:
        """The family's pipeline: the file's transformer (and an all-in-one file's encoders/VAE), the rest from the
        ``components`` folder."""
        import diffusers

        display, layout = self.family.display, self.family.single_file
        if layout is None or quantized is not None:
            raise ModelError(f"{path}: {'quantized ' if quantized is not None else ''}{display} single files are not "
                             "read; use its diffusers folder")
        if components is None:
            raise ModelError(f"{path}: a {display} single file carries no tokenizers (nor the text encoder and VAE): "
                             f"name a {display} diffusers folder to take them from with --components DIR (or "
                             "$LORAKIT_COMPONENTS)")
        pipe = self.load_folder(components, dtype, transformer=False)
        config = folder_config(components)
        if config is None:
            raise ModelError(f"{components}: no transformer/config.json to build the {display} transformer from")
        names = layout.transformer_keys(sd)
        state = {n: sd[k] for n, k in names.items()}
        what = f"{display} transformer"
        pipe.register_modules(transformer=build_on_meta(
            getattr(diffusers, layout.model_class), config,
            lambda hidden: split_original(state, hidden, path, layout.to_model, what, layout.renames), path, what,
            dtype, real_buffers=True))
        replace_encoders(pipe, sd, path, dtype, layout.text_encoders)
        if layout.ldm_vae:
            replace_vae(pipe, sd, path, dtype)
        return pipe

    def arch_of(self, pipe: Any) -> str:
        return str(self.arch)

    def variant(self, pipe: Any) -> str:
        return str(self.arch)


CHROMA = FolderDiT(CHROMA_FAMILY)
QWEN_IMAGE = FolderDiT(QWEN_FAMILY)

