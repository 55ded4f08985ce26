"""Base models: the embedded demo model, and diffusers folders on disk (offline only).

The demo model (``demo``) is a tiny Stable Diffusion 1-architecture pipeline — UNet with cross-attention, a CLIP
text encoder with the real 49,408-token vocabulary, a VAE — built deterministically from a fixed seed, so a fresh
machine can generate without downloading anything. Its weights are random: its images are noise-like patterns,
not art. Point ``--model`` at a real model folder for real images.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError
from ..keymap.arch import Arch

DEMO = Arch.DEMO
DEMO_SEED = 20261123


class ModelError(LorakitError):
    """A base model that cannot be loaded (names the path and the problem). Single files raise
    ``single_file.CheckpointError``, a ``LorakitError`` too."""


@dataclass
class BaseModel:
    pipe: Any  # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline
    name: str
    hash: str  # A1111 "Model hash" (AutoV2-style, 10 hex digits)
    arch: Arch

    @property
    def sdxl(self) -> bool:
        return self.arch == Arch.SDXL


def load_model(spec: str | None) -> BaseModel:
    """``None``/``"demo"``: the embedded demo model; else a diffusers model folder (``model_index.json``)."""
    if spec in (None, DEMO):
        return demo_model()
    path = Path(spec)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or folder")
    if path.is_dir() and (path / "model_index.json").is_file():
        return _diffusers_folder(path)
    if path.is_file():
        return load_single_file(path)
    raise ModelError(f"{path}: not a diffusers model folder (no model_index.json)")


def load_single_file(path: Path, configs: Mapping[str, Mapping[str, Any]] | None = None) -> BaseModel:
    """An A1111-style ``.safetensors``/``.ckpt`` checkpoint (SD1, SD2, SDXL; ``configs`` default to the full-size
    ones of the architecture its tensors show)."""
    from ..files.hashes import cached_sha256
    from .single_file import (
        build_pipeline,
        checkpoint_arch,
        checkpoint_tensors,
        default_configs,
    )

    sd = checkpoint_tensors(path)
    arch = checkpoint_arch(sd, path)
    pipe = build_pipeline(sd, path, arch, configs or default_configs(arch))
    return BaseModel(pipe, path.stem, cached_sha256(path)[:10], arch)


def _diffusers_folder(path: Path) -> BaseModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path / 'model_index.json'}: unreadable ({e})") from None
    cls_name = index.get("_class_name", "")
    cls = StableDiffusionXLPipeline if "XL" in cls_name else StableDiffusionPipeline
    try:
        pipe = cls.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                   requires_safety_checker=False) if cls is StableDiffusionPipeline else \
            cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelError(f"{path}: could not load the model ({type(e).__name__}: {str(e)[:200]})") from None
    from ..patch.targets import model_arch

    arch = Arch.SDXL if cls is StableDiffusionXLPipeline else model_arch({"unet": pipe.unet})
    digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode() + str(path.resolve()).encode()).hexdigest()
    return BaseModel(pipe, path.name, digest[:10], arch)


def demo_components(seed: int = DEMO_SEED) -> dict[str, torch.nn.Module]:
    """UNet, text encoder and VAE of the demo model, deterministic for a given torch version."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    return {"unet": unet.eval(), "text_encoder": text_encoder.eval(), "vae": vae.eval()}


def demo_model() -> BaseModel:
    from diffusers import StableDiffusionPipeline

    from ..generate.samplers import scheduler_for
    from ..generate.tokenizer import clip_tokenizer

    c = demo_components()
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=clip_tokenizer(),
                                   unet=c["unet"], scheduler=scheduler_for("Euler a"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    digest = hashlib.sha256(f"lorakit-demo-sd1/{DEMO_SEED}/{torch.__version__}".encode()).hexdigest()
    return BaseModel(pipe, DEMO, digest[:10], Arch.DEMO)
