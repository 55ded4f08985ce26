"""FLUX.1 base models: diffusers folders (``FluxPipeline``), and single files — BFL transformer-only files
(``flux1-dev.safetensors``) and ComfyUI all-in-one checkpoints (``model.diffusion_model.`` + ``text_encoders.`` +
``vae.``/``first_stage_model.``) — whose transformer is converted with lorakit's own BFL map (``keymap.flux``:
fused rows split by the hidden width of the config, never a hard-coded 3072), offline.

A single file does not carry tokenizers (nor, transformer-only, the text encoders and VAE): those come from a FLUX.1
diffusers folder named by ``components`` (``--components DIR``, ``$LORAKIT_COMPONENTS``), which also gives the
scheduler and, when it has one, the transformer's config; else the shipped config of the variant the file shows
(``guidance_in`` keys: dev; none: schnell).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import CheckpointError, ModelError
from ..files.inputs import read_json
from ..keymap import flux as fluxmap
from ..keymap.arch import Arch
from .dit_files import (build_on_meta, folder_config, prefixed, replace_encoders, replace_vae,
                        split_original)

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # BFL transformer keys in ComfyUI / Forge files
T = TypeVar("T")
TE_PREFIXES = dict(fluxmap.SINGLE_FILE.text_encoders)  # an all-in-one file's CLIP-L and T5


def is_flux_index(index: Any) -> bool:
    """Whether a ``model_index.json`` (any JSON value) is a FLUX.1 pipeline's (FluxPipeline, FluxKontextPipeline, …)."""
    return isinstance(index, Mapping) and str(index.get("_class_name", "")).startswith("Flux")


def load_folder(path: Path, dtype: torch.dtype) -> Any:
    """A FluxPipeline from a diffusers folder, offline."""
    from diffusers import FluxPipeline

    try:
        return FluxPipeline.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelError(f"{path}: could not load the FLUX.1 model ({type(e).__name__}: {str(e)[:200]})") from None


def transformer_keys(sd: Mapping[str, T]) -> dict[str, T]:
    """The transformer tensors (or header entries) of a single file, prefixes stripped: BFL names (a bare BFL
    file has no prefix), or diffusers names (diffusers-keyed GGUF files)."""
    return prefixed(sd, PREFIXES, lambda key: fluxmap.is_bfl_path(key) or key.split(".", 1)[0] in fluxmap.DIFFUSERS_HEADS)


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor], hidden: int, path: Path) -> dict[str, torch.Tensor]:
    """BFL transformer tensors → ``FluxTransformer2DModel`` names: renamed, fused rows split by ``hidden`` (the
    config's ``num_attention_heads·attention_head_dim``), the final adaLN's halves swapped, RMSNorm ``scale`` →
    ``weight``."""
    return split_original(sd, hidden, path, fluxmap.to_model, "FLUX.1 transformer", {"scale": "weight"})


def transformer_config(components: Path | None, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The components folder's ``transformer/config.json``, else the shipped config of the variant the keys show."""
    cfg = folder_config(components)
    if cfg is not None:
        return cfg
    from .flux_configs import variant_config

    guided = any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in sd)
    return variant_config("flux-1-dev" if guided else "flux-1-schnell")


def build_transformer(bfl: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: Path,
                      dtype: torch.dtype) -> Any:
    """A FluxTransformer2DModel made on ``meta`` and filled with the converted tensors (no random init)."""
    from diffusers import FluxTransformer2DModel

    return build_on_meta(FluxTransformer2DModel, config, lambda hidden: bfl_to_diffusers(bfl, hidden, path), path,
                         "FLUX.1 transformer", dtype)


def load_single_file(path: Path, sd: Mapping[str, torch.Tensor], components: Path | None,
                     dtype: torch.dtype, quantized: Any = None) -> Any:
    """A FluxPipeline from a BFL/ComfyUI single file plus a FLUX.1 diffusers folder for what the file lacks;
    ``quantized`` (``quant.files.Quantized``): the file's transformer is GGUF or fp8 and stays so."""
    if components is None:
        raise ModelError(f"{path}: a FLUX.1 single file carries no tokenizers (a transformer-only file no text "
                         "encoders or VAE either): name a FLUX.1 diffusers folder to take them from with "
                         "--components DIR (or $LORAKIT_COMPONENTS)")
    base = load_folder(components, dtype) if _is_folder(components) else None
    if base is None:
        raise ModelError(f"{components}: not a FLUX.1 diffusers folder (no model_index.json of a Flux pipeline)")
    config = transformer_config(components, transformer_keys(quantized.tensors if quantized is not None else sd))
    if quantized is not None:
        base.transformer = build_quantized_transformer(quantized, config, path, dtype)
    else:
        base.transformer = build_transformer(transformer_keys(sd), config, path, dtype)
    replace_encoders(base, sd, path, dtype, TE_PREFIXES)
    replace_vae(base, sd, path, dtype)
    return base


def build_quantized_transformer(quantized: Any, config: Mapping[str, Any], path: Path, dtype: torch.dtype) -> Any:
    """A FluxTransformer2DModel whose Linears keep the file's GGUF blocks / fp8 weights (``quant/build.py``):
    BFL names converted on the raw rows (a GGUF block never crosses a row, so the row split is exact), the
    fp8 scales carried to every part of a fused layer (per row: split with the rows)."""
    from diffusers import FluxTransformer2DModel

    from ..quant.build import fill_quantized

    tensors = transformer_keys(quantized.tensors)
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    bfl = any(fluxmap.is_bfl_path(k) for k in tensors)
    state = bfl_to_diffusers(tensors, hidden, path) if bfl else dict(tensors)
    scales = _part_scales(transformer_keys({f"{k}.s": v for k, v in quantized.scales.items()}), hidden, path) if bfl \
        else {k: v for k, v in transformer_keys({f"{k}.s": v for k, v in quantized.scales.items()}).items()}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    return fill_quantized(model, state, {k.removesuffix(".s"): v for k, v in scales.items()}, path,
                          "FLUX.1 transformer", dtype)


def _part_scales(scales: Mapping[str, torch.Tensor], hidden: int, path: Path) -> dict[str, torch.Tensor]:
    """BFL layer → fp8 scale, moved to the diffusers layers: a per-tensor scale to every part of a fused layer, a
    per-row one split with the rows."""
    out: dict[str, torch.Tensor] = {}
    for key, s in scales.items():
        layer = key.removesuffix(".s")
        target = fluxmap.to_model(layer)
        if target is None:
            raise CheckpointError(f"{path}: a scale for {layer}, which is not a FLUX.1 layer")
        if isinstance(target, str):
            out[f"{target}.s"] = s
        elif s.numel() == 1:
            out.update({f"{t}.s": s for t in target.targets})
        else:
            split = bfl_to_diffusers({f"{layer}.weight": s}, hidden, path)
            out.update({f"{k.removesuffix('.weight')}.s": v for k, v in split.items()})
    return out


def _is_folder(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return is_flux_index(read_json(index))
    except ValueError:
        return False


def variant(pipe: Any) -> str:
    """``flux-1-dev`` (guidance embedding), ``flux-1-schnell`` (none); ``-control``/``fill`` by input width."""
    cfg = pipe.transformer.config
    if int(cfg.in_channels) > 4 * int(getattr(pipe.vae.config, "latent_channels", 16)):
        return "flux-1-dev-control"
    return "flux-1-dev" if cfg.guidance_embeds else "flux-1-schnell"


ARCH = Arch.FLUX1
# the interface ``models.loading`` asks of a DiT family's model module
ARCHES = (Arch.FLUX1,)
HALF = torch.bfloat16  # FLUX.1's activations overflow fp16: bf16 on a GPU (as BFL, diffusers and Forge run it)
is_index = is_flux_index


def is_file(sd: Mapping[str, Any]) -> bool:
    """Whether a single file's keys are a FLUX.1 transformer's."""
    from ..keymap.detection import detect
    from ..keymap.families import FLUX1

    keys = transformer_keys(sd)
    return bool(keys) and detect(list(keys)[:64], {}) is FLUX1


def arch_of(pipe: Any) -> str:
    return ARCH
