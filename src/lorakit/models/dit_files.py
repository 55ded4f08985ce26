"""What the single files of the DiT families (FLUX.1, SD3) share: an original-layout transformer (BFL, SAI) turned
into diffusers names by the family's own ``LayoutMap`` (fused rows split by the config's hidden width, swapped halves
put back), and the text encoders / VAE of an all-in-one file (ComfyUI / SAI ``text_encoders.<name>.transformer.``,
``vae.`` or ``first_stage_model.``) replacing those of the components folder."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ModelError
from ..files.inputs import read_json
from ..keymap.layouts import Target

VAE_PREFIXES = ("vae.", "first_stage_model.")


def split_original(sd: Mapping[str, torch.Tensor], hidden: int, path: Path, to_model: Callable[[str], Target | None],
                   what: str, renames: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Original-layout transformer tensors → the diffusers model's names: renamed, fused rows split by ``hidden``
    (the config's ``num_attention_heads·attention_head_dim``), swapped halves put back; ``renames``: parameter names
    of the layout that diffusers spells otherwise (BFL's RMSNorm ``scale`` → ``weight``). Row slices only, so
    quantized rows (GGUF blocks run along rows) split exactly too."""
    params = {"weight": "weight", "bias": "bias", **(renames or {})}
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        module, _, param = key.rpartition(".")
        target = to_model(module)
        if target is None or param not in params:
            raise CheckpointError(f"{path}: {key} is not a {what} tensor")
        param = params[param]
        if isinstance(target, str):
            out[f"{target}.{param}"] = t
            continue
        pieces = target.pieces(int(t.shape[0]), hidden)
        if isinstance(pieces, str):
            raise CheckpointError(f"{path}: {key} {tuple(t.shape)} cannot be split onto {', '.join(target.targets)}: "
                                  f"{pieces}")
        for part, rows in pieces:
            out[f"{part}.{param}"] = torch.cat([t[a:b] for a, b in rows]) if len(rows) > 1 else t[rows[0][0]:rows[0][1]]
    return out


def replace_encoders(pipe: Any, sd: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype,
                     prefixes: Mapping[str, str]) -> None:
    """An all-in-one file's text encoders (HF names under ``prefixes[component]``) replace the folder's."""
    from .single_file import _fill

    for name, prefix in prefixes.items():
        state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        encoder = getattr(pipe, name, None)
        if not state or encoder is None:
            continue
        with torch.device("meta"):
            fresh = type(encoder)(encoder.config)
        state = {k.removeprefix("text_model."): v for k, v in state.items()} if not hasattr(fresh, "text_model") \
            else state
        _fill(fresh, {k: v for k, v in state.items() if k in fresh.state_dict()}, path, name.replace("_", " "), dtype)
        setattr(pipe, name, fresh.eval())


def replace_vae(pipe: Any, sd: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """An all-in-one file's VAE (LDM names) replaces the folder's."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .single_file import _fill

    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        return
    state = {"first_stage_model." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in pipe.vae.config.items() if not k.startswith("_")})
    _fill(vae, convert_ldm_vae_checkpoint(state, dict(vae.config)), path, "VAE", dtype)
    pipe.vae = vae.eval()


def prefixed(sd: Mapping[str, Any], prefixes: tuple[str, ...], bare: Callable[[str], bool]) -> dict[str, Any]:
    """The transformer entries of a single file, prefixes stripped (``bare``: a key of a file without prefixes)."""
    out: dict[str, Any] = {}
    for key, t in sd.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                out[key[len(prefix):]] = t
                break
        else:
            if bare(key):
                out[key] = t
    return out


def folder_config(components: Path | None, part: str = "transformer") -> dict[str, Any] | None:
    """A components folder's ``part/config.json`` as constructor arguments (diffusers' ``_`` keys dropped), or
    ``None`` when there is none (the family's shipped config is used then)."""
    path = components / part / "config.json" if components is not None else None
    if path is None or not path.is_file():
        return None
    try:
        cfg = read_json(path)
    except ValueError as e:
        raise ModelError(f"{path}: unreadable ({str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: not a JSON object")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_on_meta(cls: Any, config: Mapping[str, Any], tensors: Callable[[int], Mapping[str, torch.Tensor]],
                  path: Path, what: str, dtype: torch.dtype, real_buffers: bool = False) -> Any:
    """A ``cls(**config)`` transformer made on ``meta`` and filled with ``tensors(hidden)`` (the file's tensors in
    the model's names; ``hidden`` = heads × head width from the config) — no random init. ``real_buffers``: the
    buffers are made as the constructor computes them (Chroma's non-persistent ``mod_proj`` table, which no file
    holds), only the parameters on ``meta``."""
    from .single_file import _fill

    with params_on_meta() if real_buffers else torch.device("meta"):
        model = cls(**config)
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    _fill(model, dict(tensors(hidden)), path, what, dtype)
    return model.eval()


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside put every parameter on ``meta`` as it is registered (its values are never computed:
    initialising a meta tensor is free), while buffers are computed as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
