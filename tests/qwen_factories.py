"""Tiny Qwen-Image models from diffusers' test configs (``tests/lora/test_lora_layers_qwenimage.py``: 2 blocks of
width 48 = 3 heads × 16), a tiny Qwen2.5-VL text encoder from a config and a byte-level Qwen2 tokenizer built in code
(every byte one token, no merges: the real vocabulary is not available offline), and the independent reference:
Qwen-Image's module table written out here by hand (the names of ``QwenImageTransformer2DModel``)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from lorakit.adapters import build_adapter
from tests.factories import adapter_tensors

H = 48  # hidden width of the tiny transformer (3 heads × 16)
BLOCKS = 2


def tiny_qwen_transformer(seed: int = 0, blocks: int = BLOCKS) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=blocks,
                                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4)).eval()


def tiny_qwen_encoder(seed: int = 1) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=512, rope_theta=1000000.0,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})
    vision = dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=16, vocab_size=512)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable-character table (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b if b in keep else next(extra)) for b in range(256)]


def tiny_qwen_tokenizer() -> object:
    """A Qwen2Tokenizer over single bytes (ids 0–255) and the chat template's special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def tiny_qwen_vae(seed: int = 2) -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                  latents_std=[1.5, 0.8, 1.0, 2.0]).eval()


def tiny_qwen_pipeline(seed: int = 0) -> object:
    """A tiny QwenImagePipeline: the transformer above (16 = 4·4 packed latent channels), the VAE (4 latent
    channels), the encoder and tokenizer, Qwen-Image's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=tiny_qwen_vae(seed + 2), text_encoder=tiny_qwen_encoder(seed + 1),
                             tokenizer=tiny_qwen_tokenizer(), transformer=tiny_qwen_transformer(seed))


# -- the independent reference: every Linear a Qwen-Image LoRA names, one to one ------------------------------------
def qwen_table(blocks: int = BLOCKS) -> list[str]:
    top = ["img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
           "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out"]
    per_block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                 "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]
    return top + [f"transformer_blocks.{i}.{m}" for i in range(blocks) for m in per_block]


def qwen_lora(transformer: torch.nn.Module, kind: str, rank: int = 4, seed: int = 0,
              modules: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Module path → leaves of ``kind`` at the module's shape, for every module of the table."""
    gen = torch.Generator().manual_seed(seed)
    return {m: adapter_tensors(kind, tuple(transformer.get_submodule(m).weight.shape), rank, gen)
            for m in (modules or qwen_table())}


def reference_delta(weight: torch.Tensor, leaves: Mapping[str, torch.Tensor], strength: float) -> torch.Tensor:
    adapter, rest = build_adapter(dict(leaves), "ref")
    assert adapter is not None and not rest, rest
    return adapter.delta(weight.detach().float(), strength)


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")
