"""Full-size SD3 / SD3.5 configs, shipped so a SAI single file loads offline without a ``transformer/config.json``
and so tests can build the full-size networks on the ``meta`` device: the ``SD3Transformer2DModel`` arguments of
stabilityai/stable-diffusion-3-medium-diffusers, -3.5-medium and -3.5-large (``transformer/config.json``), and their
text encoders (CLIP-L and OpenCLIP-G as ``CLIPTextModelWithProjection``, T5 v1.1 XXL)."""
from __future__ import annotations

from typing import Any

from ..keymap.arch import Arch

_COMMON: dict[str, Any] = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                               attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048)
TRANSFORMERS: dict[str, dict[str, Any]] = {
    Arch.SD3_MEDIUM: dict(_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                          pos_embed_max_size=192),
    Arch.SD35_MEDIUM: dict(_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                           pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    Arch.SD35_LARGE: dict(_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                          pos_embed_max_size=192, qk_norm="rms_norm"),
}
CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77)
CLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              projection_dim=1280, hidden_act="gelu", max_position_embeddings=77)
T5_XXL: dict[str, Any] = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24, vocab_size=32128,
                              feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def transformer_config(arch: str) -> dict[str, Any]:
    return dict(TRANSFORMERS[arch])


def build_components(arch: str, device: str = "meta", encoders: bool = True) -> dict[str, Any]:
    """The full-size transformer (and text encoders) of an SD3 size, with meta (or random) weights."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device(device):
        out: dict[str, Any] = {"transformer": SD3Transformer2DModel(**transformer_config(arch))}
        if encoders:
            out["text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))
            out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
            out["text_encoder_3"] = T5EncoderModel(T5Config(**T5_XXL))
    return out
