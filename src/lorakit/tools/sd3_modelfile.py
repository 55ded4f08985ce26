"""SD3 / SD3.5 base models as files for the tools (``bake``, ``extract``), read one tensor at a time: a diffusers
folder (``transformer/``, ``text_encoder/`` CLIP-L, ``text_encoder_2/`` CLIP-G, ``text_encoder_3/`` T5), its size
from the transformer's config (``keymap.sd3.Sizes``); a SAI single file through ``dit_modelfile.single`` with SAI's
map (``keymap.sd3.SINGLE_FILE``: fused ``qkv`` rows, the swapped adaLN halves as row ranges), its size from its
tensors (``models.sd3.size_of_file``)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import ToolError
from ..files.header import read_header
from ..keymap import sd3 as sd3map
from ..keymap.families import SD3, Family
from ..models.sd3 import is_file, is_index, size_of_file
from .dit_modelfile import single
from .modelfile import ModelFile, _json, read_folder

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def sd3_model(p: Path, configs: Mapping[str, Mapping[str, Any]] | None = None) -> ModelFile | None:
    """The SD3 model folder or SAI single file at ``p``; ``None`` when ``p`` is no SD3 model (another reader's)."""
    if p.is_file() and p.suffix.lower() == ".safetensors":
        header = read_header(p)
        if not is_file(header.tensors):
            return None
        size = size_of_file({n: header.tensors[k] for n, k in sd3map.SINGLE_FILE.transformer_keys(header.tensors)
                             .items()})
        return single(p, header, configs or {}, SD3, sd3map.SINGLE_FILE, COMPONENTS, size)
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
    return sd3_model(p, configs)
