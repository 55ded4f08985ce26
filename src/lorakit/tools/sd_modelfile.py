"""Stable Diffusion (SD1/SD2/SDXL) base models as files for the tools: a diffusers folder (``unet/``,
``text_encoder*/``) or an A1111 single file. Single-file UNet names come from ``tools.checkpoint.unet_to_ldm`` (the
exporter) for the UNet config in use; OpenCLIP text encoders (SD2, SDXL's second) keep q/k/v fused in ``in_proj``:
each projection is a row slice. It is asked last (``modelfile.family_readers``): what no other family claims is read
here, or refused with the reason."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import ToolError
from ..files.header import read_header
from ..keymap.arch import Arch
from ..keymap.families import Family
from ..keymap.names import canonical_te_path
from .modelfile import ModelFile, Ref, TensorFile, _json, read_folder

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_PREFIX = "model.diffusion_model."
HF_TE = {"cond_stage_model.transformer.text_model.": "text_encoder", "cond_stage_model.transformer.": "text_encoder",
         "conditioner.embedders.0.transformer.text_model.": "text_encoder"}
OPENCLIP_TE: dict[str, tuple[str, str]] = {Arch.SD2: ("cond_stage_model.model.", "text_encoder"),
               Arch.SDXL: ("conditioner.embedders.1.model.", "text_encoder_2")}
_OPENCLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}




def read(p: Path, configs: Mapping[str, Mapping[str, Any]] | None, family: Family | None = None) -> ModelFile:
    """The SD model at ``p``; a ``ToolError`` saying why when ``p`` is none."""
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ToolError(f"{p}: not a diffusers model folder (no model_index.json)")
        return _open_folder(p)
    if not p.is_file():
        raise ToolError(f"{p}: no such model file or folder")
    if p.suffix.lower() != ".safetensors":
        raise ToolError(f"{p}: the tools read .safetensors checkpoints only (pickles load whole and may run code); "
                        "convert it first")
    return _open_single(p, configs)


def _open_folder(p: Path) -> ModelFile:
    files, params, config = read_folder(p, COMPONENTS)
    if "unet" not in config:
        raise ToolError(f"{p}: the model folder has no unet/")
    index = _json(p / "model_index.json")
    arch = Arch.SDXL if "XL" in str(index.get("_class_name", "")) else _arch_from_config(config)
    return ModelFile(p, "folder", arch, files, params, config)


def _arch_from_config(config: dict[str, Any]) -> str:
    """What ``patch.targets.model_arch`` says of the loaded model (the same facts, from the config files)."""
    from ..patch.targets import model_arch

    return model_arch({k: SimpleNamespace(config=SimpleNamespace(**v)) for k, v in config.items()})  # type: ignore[misc]


def _open_single(p: Path, configs: Mapping[str, Mapping[str, Any]] | None) -> ModelFile:
    from ..models.single_file import checkpoint_arch, default_configs

    tf = TensorFile(p, read_header(p))
    keys = list(tf.header.tensors)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ToolError(f"{p}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys)")
    arch = checkpoint_arch(dict.fromkeys(keys), p)  # type: ignore[arg-type]
    cfg = {k: dict(v) for k, v in (configs or default_configs(arch)).items()}
    params: dict[str, Ref] = {}
    _map_unet(tf, cfg["unet"], params)
    _map_hf_te(tf, params)
    if arch in OPENCLIP_TE:
        prefix, component = OPENCLIP_TE[arch]
        _map_openclip(tf, prefix, component, params)
    config = {"unet": cfg["unet"], "text_encoder": cfg.get("text_encoder", {})}
    if arch == Arch.SDXL:
        config["text_encoder_2"] = cfg.get("text_encoder_2", {})
    return ModelFile(p, "single", arch, [tf], params, config)


def _map_unet(tf: TensorFile, unet_config: Mapping[str, Any], params: dict[str, Ref]) -> None:
    from diffusers import UNet2DConditionModel

    from .checkpoint import unet_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    for name, _ in unet.named_parameters():
        key = UNET_PREFIX + unet_to_ldm(name, unet.config)
        if key in tf.header.tensors:
            tf.add(key, f"unet.{name}", Ref(tf, key), params)


def _map_hf_te(tf: TensorFile, params: dict[str, Ref]) -> None:
    for key in tf.header.tensors:
        for prefix, component in HF_TE.items():
            if key.startswith(prefix):
                name = canonical_te_path(key[len(prefix):])
                tf.add(key, f"{component}.{name}", Ref(tf, key), params)
                break


def _map_openclip(tf: TensorFile, prefix: str, component: str, params: dict[str, Ref]) -> None:
    """OpenCLIP names → transformers CLIP names (the inverse of ``checkpoint.openclip_state``)."""
    top = {"ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    for key in tf.header.tensors:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in top:
            tf.add(key, f"{component}.{top[rest]}", Ref(tf, key), params)
        elif rest == "text_projection":
            tf.add(key, f"{component}.text_projection.weight", Ref(tf, key, transposed=True), params)
        elif rest.startswith("transformer.resblocks."):
            _map_resblock(tf, key, rest, component, params)


def _map_resblock(tf: TensorFile, key: str, rest: str, component: str, params: dict[str, Ref]) -> None:
    i, _, tail = rest[len("transformer.resblocks."):].partition(".")
    layer = f"{component}.encoder.layers.{i}"
    if tail.startswith("attn.in_proj_"):
        leaf = tail[len("attn.in_proj_"):]
        for n, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            tf.add(key, f"{layer}.self_attn.{proj}.{leaf}", Ref(tf, key, part=(n, 3)), params)
        return
    module, _, leaf = tail.rpartition(".")
    if module in _OPENCLIP_LAYER:
        tf.add(key, f"{layer}.{_OPENCLIP_LAYER[module]}.{leaf}", Ref(tf, key), params)
