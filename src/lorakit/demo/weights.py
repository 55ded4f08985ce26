"""The trained demo model: its architecture (SD1-style, tiny), and its weights, shipped in
``lorakit/data/demo/`` — ``demo.safetensors`` (fp16; keys ``unet.*``, ``text_encoder.*``, ``vae.*``) and
``demo.json`` (the architecture configs and the training recipe), written by ``scripts/train_demo_model.py``."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..errors import ModelError

DATA_DIR = Path(str(files("lorakit") / "data" / "demo"))
WEIGHTS = DATA_DIR / "demo.safetensors"
META = DATA_DIR / "demo.json"
COMPONENTS = ("unet", "text_encoder", "vae")

# The architecture: 64-px pictures, 16×16×4 latents (the VAE downsamples 4×).
UNET: dict[str, Any] = {
    "sample_size": 16, "block_out_channels": [64, 128], "layers_per_block": 1, "norm_num_groups": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64, "attention_head_dim": 8}
TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 49407}
VAE: dict[str, Any] = {
    "block_out_channels": [16, 32, 32], "latent_channels": 4, "norm_num_groups": 8, "sample_size": 64,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
CONFIGS: dict[str, dict[str, Any]] = {"unet": UNET, "text_encoder": TEXT_ENCODER, "vae": VAE}


def build(configs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fresh (randomly initialised, from torch's global RNG) UNet, text encoder and VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = configs or CONFIGS
    return {"unet": UNet2DConditionModel(**configs["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "vae": AutoencoderKL(**configs["vae"])}


def read_meta(folder: Path = DATA_DIR) -> dict[str, Any]:
    path = folder / META.name
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: the demo model's description is missing or unreadable ({e}); "
                         "reinstall lorakit or run scripts/train_demo_model.py") from None


def load_components(folder: Path = DATA_DIR) -> dict[str, Any]:
    """The demo model's UNet, text encoder and VAE with the shipped weights (or those in ``folder``), in fp32 on
    the CPU, in eval mode."""
    from safetensors.torch import load_file

    meta = read_meta(folder)
    modules = build(meta["configs"])
    weights = folder / WEIGHTS.name
    try:
        tensors = load_file(str(weights))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{weights}: the demo model's weights are missing or unreadable ({e})") from None
    for name, module in modules.items():
        prefix = name + "."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelError(f"{weights}: {name} weights do not fit the architecture in {META.name}: "
                             f"{str(e)[:300]}") from None
    modules["vae"].register_to_config(scaling_factor=float(meta["vae_scaling_factor"]))
    return {name: module.eval() for name, module in modules.items()}


@lru_cache(maxsize=4)
def weights_sha256(folder: Path = DATA_DIR) -> str:
    """SHA-256 of the weights file (the demo model's hash)."""
    digest = hashlib.sha256()
    with open(folder / WEIGHTS.name, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
