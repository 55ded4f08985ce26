"""FLUX.1 model configs (full size) as constructor arguments: diffusers' ``FluxTransformer2DModel`` per variant,
transformers' ``CLIPTextConfig`` (CLIP-L) and ``T5Config`` (T5-XXL encoder), diffusers' ``AutoencoderKL``. Shipped so
nothing is downloaded; ``build_flux_components`` makes the models (on the ``meta`` device by default, where 12 B
parameters cost no memory: the full-size key-resolution tests use it).

Sources (checked against each other):

* transformer: BFL's reference code ``black-forest-labs/flux`` ``src/flux/util.py`` @802fb47 (``configs``:
  ``flux-dev`` / ``flux-schnell`` hidden 3072 = 24 heads × 128, depth 19 + 38 single, ``vec_in_dim`` 768,
  ``context_in_dim`` 4096, ``axes_dim`` [16, 56, 56], ``guidance_embed`` True / False; ``flux-dev-canny``,
  ``-depth`` and their ``-lora`` specs ``in_channels`` 128, ``flux-dev-fill`` 384, all ``out_channels`` 64),
  which are diffusers 0.42's ``FluxTransformer2DModel`` defaults apart from ``guidance_embeds`` and the
  channels (ROUND3_NOTES §1.1: ``img_in`` 3072×64, Fill 384, Depth/Canny 128);
* CLIP-L: ``openai/clip-vit-large-patch14``'s text model (``configs.CLIP_L``, as SD1);
* T5-XXL: ``google/t5-v1_1-xxl`` (FLUX's ``text_encoder_2``): d_model 4096, 24 layers, 64 heads × d_kv 64,
  d_ff 10240, gated GELU (``wi_0``/``wi_1``), vocabulary 32128; the rest are ``T5Config`` defaults;
* VAE: BFL ``AutoEncoderParams`` (ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, z 16, scale 0.3611, shift 0.1159,
  no quant convs) in diffusers' ``AutoencoderKL`` names.
"""
from __future__ import annotations

from typing import Any

from .configs import CLIP_L

_FLUX1: dict[str, Any] = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                              pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
# Variant names as ``keymap.detection.variant`` gives a LoRA's base.
FLUX1_VARIANTS: dict[str, dict[str, Any]] = {
    "flux-1-dev": dict(_FLUX1, guidance_embeds=True),
    "flux-1-schnell": dict(_FLUX1, guidance_embeds=False),
    # Canny/Depth control (the full models, and dev with a control LoRA's img_in expanded): latents + control
    "flux-1-dev-control": dict(_FLUX1, guidance_embeds=True, in_channels=128, out_channels=64),
    "flux-1-fill-dev": dict(_FLUX1, guidance_embeds=True, in_channels=384, out_channels=64),
}
T5_XXL: dict[str, Any] = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                              feed_forward_proj="gated-gelu", vocab_size=32128, relative_attention_num_buckets=32,
                              relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                              tie_word_embeddings=False)
FLUX_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=16,
                                block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                down_block_types=["DownEncoderBlock2D"] * 4,
                                up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, sample_size=1024,
                                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                use_post_quant_conv=False, force_upcast=True)
FLUX1_TEXT_ENCODERS: dict[str, dict[str, Any]] = {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL}


def build_flux_components(variant: str = "flux-1-dev", device: str = "meta") -> dict[str, Any]:
    """Full-size ``transformer`` (FLUX.1 ``variant``), ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (T5-XXL
    encoder) on ``device`` (``meta``: shapes only, no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if variant not in FLUX1_VARIANTS:
        raise ValueError(f"unknown FLUX.1 variant {variant!r}; known: {', '.join(FLUX1_VARIANTS)}")
    with torch.device(device):
        return {"transformer": FluxTransformer2DModel(**FLUX1_VARIANTS[variant]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL))}


def variant_config(variant: str) -> dict[str, Any]:
    """A copy of the ``FluxTransformer2DModel`` arguments of a FLUX.1 ``variant`` (a key of ``FLUX1_VARIANTS``)."""
    return dict(FLUX1_VARIANTS[variant])
