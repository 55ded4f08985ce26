"""FLUX.1 base models as files for the tools, read one tensor at a time: a diffusers folder (``transformer/``,
``text_encoder/`` CLIP-L, ``text_encoder_2/`` T5) or a single file — BFL's transformer-only ``flux1-dev.safetensors``
or a ComfyUI all-in-one checkpoint (``model.diffusion_model.`` + ``text_encoders.clip_l``/``t5xxl``) — whose BFL
tensors are found under the diffusers names lorakit's LoRAs use: a fused layer's parts as row ranges of its tensor
(``Ref.rows``: q/k/v/MLP of ``linear1``, the swapped halves of the final adaLN), split by the hidden width the file
itself shows (``img_in``'s rows), never a hard-coded 3072. The VAE is not read (LoRAs do not change it)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ToolError
from ..files.header import Header, read_header
from ..keymap import flux as fluxmap
from ..keymap.arch import Arch
from ..keymap.families import FLUX1, Family
from ..models.flux import is_flux_index, transformer_keys
from .dit_modelfile import single
from .modelfile import ModelFile, _json, read_folder

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")


def flux_model(p: Path, configs: Mapping[str, Mapping[str, Any]] | None = None) -> ModelFile | None:
    """The FLUX.1 model at ``p``; ``None`` when ``p`` is no FLUX.1 folder or single file (another reader's)."""
    if p.is_dir():
        index = p / "model_index.json"
        return _folder(p) if index.is_file() and is_flux_index(_json(index)) else None
    if p.is_file() and p.suffix.lower() == ".safetensors":
        header = read_header(p)
        if any(k.startswith("double_blocks.") for k in transformer_keys(header.tensors)):
            return _single(p, header, configs or {})
    return None


def _folder(p: Path) -> ModelFile:
    files, params, config = read_folder(p, COMPONENTS)
    if "transformer" not in config:
        raise ToolError(f"{p}: the FLUX.1 model folder has no transformer/")
    return ModelFile(p, "folder", Arch.FLUX1, files, params, config)


def _single(p: Path, header: Header, configs: Mapping[str, Mapping[str, Any]]) -> ModelFile:
    return single(p, header, configs, FLUX1, fluxmap.SINGLE_FILE, COMPONENTS)


def read(p: Path, configs: Mapping[str, Mapping[str, Any]] | None, family: Family | None = None) -> ModelFile | None:
    """``modelfile.family_readers``' interface: ``flux_model``."""
    return flux_model(p, configs)
