"""SD3 / SD3.5 base models as files for the tools (``bake``, ``extract``), read one tensor at a time: a diffusers
folder (``transformer/``, ``text_encoder/`` CLIP-L, ``text_encoder_2/`` CLIP-G, ``text_encoder_3/`` T5), its size
from the transformer's config (``keymap.sd3.Sizes``). SAI single files are not read here yet (their fused rows would
need ``flux_modelfile``'s row references with SD3's map): the tools say so."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import ToolError
from ..files.header import read_header
from ..keymap import sd3 as sd3map
from ..keymap.families import Family
from ..models.sd3 import is_file, is_index
from .modelfile import ModelFile, _json, read_folder

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def sd3_model(p: Path) -> ModelFile | None:
    """The SD3 model folder at ``p``; ``None`` when ``p`` is no SD3 model (another reader's)."""
    if p.is_file() and p.suffix.lower() == ".safetensors" and is_file(read_header(p).tensors):
        raise ToolError(f"{p}: an SD3 single file (SAI names); the tools read SD3 diffusers folders — give the "
                        "folder (e.g. stabilityai/stable-diffusion-3.5-large)")
    index = p / "model_index.json"
    if not (p.is_dir() and index.is_file() and is_index(_json(index))):
        return None
    files, params, config = read_folder(p, COMPONENTS)
    if "transformer" not in config:
        raise ToolError(f"{p}: the SD3 model folder has no transformer/")
    transformer = SimpleNamespace(config=SimpleNamespace(**config["transformer"]))
    return ModelFile(p, "folder", sd3map.SIZES.of_model({"transformer": transformer}), files, params, config)


def read(p: Path, configs: Mapping[str, Mapping[str, Any]] | None, family: Family | None = None) -> ModelFile | None:
    """``modelfile.family_readers``' interface: ``sd3_model``."""
    return sd3_model(p)
