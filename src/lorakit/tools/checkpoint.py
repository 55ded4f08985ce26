"""Export a diffusers SD1 / SD2 / SDXL pipeline as an A1111-style single-file checkpoint (LDM key names).

The inverse of the conversion ``models.load_single_file`` does on reading; general in ``layers_per_block`` so
small test pipelines can be written too. UNet: ``model.diffusion_model.``; VAE: ``first_stage_model.`` (its
attention projections become 1×1 convolutions); text encoders: SD1 ``cond_stage_model.transformer.text_model.``
(transformers names), SD2 ``cond_stage_model.model.`` (OpenCLIP names: fused q/k/v ``in_proj``, ``ln_1``,
``c_fc``…), SDXL ``conditioner.embedders.0.transformer.text_model.`` and ``conditioner.embedders.1.model.``.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from ..keymap.arch import Arch
from ..keymap.ldm import RESNET as LDM_RESNET
from ..keymap.ldm import TOP as LDM_TOP

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
# The UNet's names come from keymap/ldm.py's tables (LDM → diffusers there), read backwards here; the block
# numbering below is the same formula, general in layers_per_block so small test pipelines can be written too.
_RESNET = {diffusers: ldm for ldm, diffusers in LDM_RESNET.items()}
_TOP = {diffusers: ldm for ldm, diffusers in LDM_TOP.items()}
TEXT_PREFIXES: dict[str, tuple[str | None, str | None]] = {Arch.SD1: ("cond_stage_model.transformer.text_model.", None),
                 Arch.SD2: (None, "cond_stage_model.model."),
                 Arch.SDXL: ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")}


def unet_to_ldm(name: str, config: Any) -> str:
    """One diffusers UNet parameter name → its LDM name (``down_blocks.1.attentions.0.proj_in.weight`` →
    ``input_blocks.4.1.proj_in.weight`` for two layers per block)."""
    per = config.layers_per_block + 1
    for old, new in _TOP.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    parts = name.split(".")
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{_resnet(rest) if kind == 'resnets' else rest}"
    block, i, kind, j, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if block == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{1 + i * per + per - 1}.0.op.{rest.split('.', 1)[1]}"
        return f"input_blocks.{1 + i * per + j}.{_sub(kind, rest)}"
    if kind == "upsamplers":
        has_attn = "CrossAttn" in config.up_block_types[i]
        return f"output_blocks.{i * per + per - 1}.{2 if has_attn else 1}.conv.{rest.split('.', 1)[1]}"
    return f"output_blocks.{i * per + j}.{_sub(kind, rest)}"


def _sub(kind: str, rest: str) -> str:
    return f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"


def _resnet(rest: str) -> str:
    head, _, param = rest.partition(".")
    return f"{_RESNET[head]}.{param}"


_Repl = str | Callable[[re.Match[str]], str]


def vae_to_ldm(name: str, config: Any) -> str:
    """One diffusers VAE parameter name → its LDM name (decoder blocks run in reverse order in LDM)."""
    n_up = len(config.up_block_types)
    subs: list[tuple[str, _Repl]] = [
            (r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out"),
            (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2"),
            (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample"),
            (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}"),
            (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample"),
            (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}"),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
            (r"conv_shortcut", "nin_shortcut"), (r"attn_1\.group_norm", "attn_1.norm"),
            (r"attn_1\.to_q", "attn_1.q"), (r"attn_1\.to_k", "attn_1.k"), (r"attn_1\.to_v", "attn_1.v"),
            (r"attn_1\.to_out\.0", "attn_1.proj_out")]
    for pattern, repl in subs:
        name = re.sub(pattern, repl, name)
    return name


def to_checkpoint(pipe: Any, arch: str) -> dict[str, torch.Tensor]:
    """The single-file state dict of a pipeline: UNet, VAE and the text encoder(s) of ``arch``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in pipe.unet.state_dict().items():
        out[UNET + unet_to_ldm(name, pipe.unet.config)] = t
    for name, t in pipe.vae.state_dict().items():
        ldm = vae_to_ldm(name, pipe.vae.config)
        is_attn_proj = re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", ldm) is not None
        out[VAE + ldm] = t[:, :, None, None] if is_attn_proj and t.dim() == 2 else t
    hf_prefix, openclip_prefix = TEXT_PREFIXES[arch]
    if hf_prefix:
        out.update({hf_prefix + k: v for k, v in _text_state(pipe.text_encoder).items()})
    if openclip_prefix:
        encoder = pipe.text_encoder_2 if arch == Arch.SDXL else pipe.text_encoder
        out.update({openclip_prefix + k: v for k, v in openclip_state(encoder).items()})
    return {k: v.contiguous() for k, v in out.items()}


def sd1_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    return to_checkpoint(pipe, Arch.SD1)


def _text_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder's tensors under transformers' CLIPTextModel names without the ``text_model.`` level."""
    return {(k.removeprefix("text_model.")): v
            for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}


def openclip_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's tensors in OpenCLIP names (q, k, v fused into ``in_proj``)."""
    sd = _text_state(encoder)
    out = {"positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([sd.pop(src + f"self_attn.{p}_proj.{part}")
                                                           for p in ("q", "k", "v")])
            out[dst + f"attn.out_proj.{part}"] = sd.pop(src + f"self_attn.out_proj.{part}")
            out[dst + f"ln_1.{part}"] = sd.pop(src + f"layer_norm1.{part}")
            out[dst + f"ln_2.{part}"] = sd.pop(src + f"layer_norm2.{part}")
            out[dst + f"mlp.c_fc.{part}"] = sd.pop(src + f"mlp.fc1.{part}")
            out[dst + f"mlp.c_proj.{part}"] = sd.pop(src + f"mlp.fc2.{part}")
    if sd:
        raise ValueError(f"text-encoder tensors without an OpenCLIP name: {sorted(sd)[:3]}")
    return out
