"""DiT base models as files for the tools, for the families described as data (``Family.pipelines`` for their
diffusers folders, ``Family.single_file`` for their checkpoints: Chroma, Qwen-Image; FLUX.1's BFL files and SD3's
SAI files through ``single``): every parameter under the diffusers name lorakit's LoRAs use, a fused original
layer's parts as row ranges of its tensor (``Ref.rows``), split by the hidden width the file itself shows. The VAE
is not read."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ToolError
from ..files.header import Header, read_header
from ..keymap.families import Family
from ..keymap.layouts import SingleFile
from ..keymap.names import canonical_te_path
from ..quant.files import IGNORED, SCALE_KEYS
from .modelfile import ModelFile, Ref, TensorFile, _json, read_folder

Configs = Mapping[str, Mapping[str, Any]]


def read(p: Path, configs: Configs | None, family: Family) -> ModelFile | None:
    """``family``'s model at ``p`` (its diffusers folder or single file); ``None`` when ``p`` is another's."""
    if p.is_dir():
        index = p / "model_index.json"
        if not (index.is_file() and str(_json(index).get("_class_name", "")) in family.pipelines):
            return None
        files, params, config = read_folder(p, ("transformer", *family.encoders))
        if "transformer" not in config:
            raise ToolError(f"{p}: the {family.display} model folder has no transformer/")
        return ModelFile(p, "folder", _arch(family), files, params, config)
    layout = family.single_file
    if layout is None or not (p.is_file() and p.suffix.lower() == ".safetensors"):
        return None
    header = read_header(p)
    if not layout.claims(header.tensors):
        return None
    return single(p, header, configs or {}, family, layout, ("transformer", *family.encoders))


def single(p: Path, header: Header, configs: Configs, family: Family, layout: SingleFile,
           components: tuple[str, ...], arch: str | None = None, tf: TensorFile | None = None) -> ModelFile:
    """A single file's transformer (``layout``) and an all-in-one file's text encoders, under canonical names;
    ``arch``: the file's size, for a family of several (SD3); ``tf``: the file read otherwise than as safetensors
    (a GGUF file: ``gguf_modelfile``)."""
    tf = tf or TensorFile(p, header)
    params: dict[str, Ref] = {}
    names = layout.transformer_keys(header.tensors)  # the layout's name → the file's key
    width = header.tensors.get(names.get(layout.hidden, ""))
    if width is None:
        raise ToolError(f"{p}: a {family.display} file without {layout.hidden}: its hidden width is unknown")
    for name, key in names.items():
        module, _, param = name.rpartition(".")
        if param in SCALE_KEYS or param in IGNORED or name in IGNORED:
            continue  # ComfyUI fp8 scales (read beside their weight: ``modelfile.with_scales``) and markers
        target = layout.to_model(module)
        if target is None or param not in ("weight", "bias", *layout.renames):
            raise ToolError(f"{p}: {key} is not a {family.display} transformer tensor")
        param = layout.renames.get(param, param)
        if isinstance(target, str):
            tf.add(key, f"transformer.{target}.{param}", Ref(tf, key), params)
            continue
        pieces = target.pieces(int(header.tensors[key].shape[0]), int(width.shape[0]))
        if isinstance(pieces, str):
            raise ToolError(f"{p}: {key} cannot be split onto {', '.join(target.targets)}: {pieces}")
        for part, rows in pieces:
            tf.add(key, f"transformer.{part}.{param}", Ref(tf, key, rows=rows), params)
    for key in header.tensors:
        for component, prefix in layout.text_encoders.items():
            if key.startswith(prefix):
                tf.add(key, f"{component}.{canonical_te_path(key[len(prefix):])}", Ref(tf, key), params)
    config: dict[str, Any] = {c: dict(configs.get(c, {})) for c in components
                              if any(n.startswith(c + ".") for n in params)}
    return ModelFile(p, "single", arch or _arch(family), [tf], params, config)


def _arch(family: Family) -> str:
    if family.arch is None:
        raise ToolError(f"{family.display} models of several sizes are read by their own reader")
    return str(family.arch)
