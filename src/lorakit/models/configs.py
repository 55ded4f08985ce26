"""Model configs of the supported architectures (full size), as constructor arguments for diffusers'
``UNet2DConditionModel`` and transformers' ``CLIPTextConfig``. Shipped so nothing is ever downloaded."""
from __future__ import annotations

from typing import Any

from ..keymap.arch import Arch

SD1_UNET: dict[str, Any] = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD2_UNET: dict[str, Any] = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                use_linear_projection=True)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
    block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_CLIP: dict[str, Any] = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
CLIP_L: dict[str, Any] = dict(_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H: dict[str, Any] = dict(_CLIP, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, hidden_act="gelu", projection_dim=512, pad_token_id=1)
CLIP_G: dict[str, Any] = dict(_CLIP, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                              num_attention_heads=20, hidden_act="gelu", projection_dim=1280, pad_token_id=1)

SD_VAE: dict[str, Any] = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                              sample_size=512)

SDXL_VAE: dict[str, Any] = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025)

ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    Arch.SD1: {"unet": SD1_UNET, "text_encoder": CLIP_L},
    Arch.SD2: {"unet": SD2_UNET, "text_encoder": OPENCLIP_H},
    Arch.SDXL: {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G},
}


def build_components(arch: str, device: str = "meta") -> dict[str, Any]:
    """Full-size UNet + text encoder(s) of ``arch`` with random (or meta) weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out: dict[str, Any] = {}
    with torch.device(device):
        for name, cfg in ARCHS[arch].items():
            if name == "unet":
                out[name] = UNet2DConditionModel(**cfg)
            else:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                out[name] = cls(CLIPTextConfig(**cfg))
    return out
