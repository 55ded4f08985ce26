"""Tiny SD3 / SD3.5 models from diffusers' test configs (2 joint blocks, so the last block — no ``to_add_out``, no
``ff_context``, a 2·h context adaLN — is there), and an independent reference for SAI-layout LoRAs: the SAI →
diffusers table written out here by hand, the fused weight rebuilt from the model, the change computed on it, then
sliced (and half-swapped). ``medium35=True`` gives an SD3.5-Medium-like model: qk-norm and ``attn2`` in block 0."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tests.factories import adapter_tensors
from tests.flux_factories import fused_weight, tiny_clip, tiny_t5

H = 32  # hidden width of the tiny transformer (4 heads × 8)
Table = dict[str, tuple[list[str], bool]]


def tiny_sd3_transformer(seed: int = 0, layers: int = 2, medium35: bool = False, channels: int = 4) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    extra: dict[str, object] = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if medium35 else {}
    return SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=channels, num_layers=layers,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=H,
                                 joint_attention_dim=32, pooled_projection_dim=64, out_channels=channels,
                                 **extra).eval()  # type: ignore[arg-type]


def tiny_clip_g(seed: int = 2) -> torch.nn.Module:
    """A CLIPTextModelWithProjection (SD3's CLIP-L and CLIP-G both are) with a 32-wide projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                      num_attention_heads=4, max_position_embeddings=77,
                                                      vocab_size=49408, projection_dim=32)).eval()


def tiny_sd3_components(seed: int = 0, dtype: torch.dtype = torch.float32, medium35: bool = False,
                        layers: int = 2, channels: int = 4) -> dict[str, torch.nn.Module]:
    out = {"transformer": tiny_sd3_transformer(seed, layers, medium35, channels), "text_encoder": tiny_clip_g(seed + 1),
           "text_encoder_2": tiny_clip_g(seed + 2), "text_encoder_3": tiny_t5(seed + 3)}
    return {k: v.to(dtype) for k, v in out.items()}


# -- the independent reference: SAI module → (diffusers modules in row order, halves swapped) -------------------------
def sai_table(layers: int, attn2: tuple[int, ...] = (), qk_norm: bool = False) -> Table:
    """Written out from ComfyUI's MMDIT_MAP_BLOCK and diffusers' single-file converter (ROUND3_NOTES §2.3)."""
    t: Table = {
        "x_embedder.proj": (["pos_embed.proj"], False), "context_embedder": (["context_embedder"], False),
        "t_embedder.mlp.0": (["time_text_embed.timestep_embedder.linear_1"], False),
        "t_embedder.mlp.2": (["time_text_embed.timestep_embedder.linear_2"], False),
        "y_embedder.mlp.0": (["time_text_embed.text_embedder.linear_1"], False),
        "y_embedder.mlp.2": (["time_text_embed.text_embedder.linear_2"], False),
        "final_layer.linear": (["proj_out"], False),
        "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
    }
    for i in range(layers):
        j, d, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == layers - 1
        t.update({
            j + "x_block.attn.qkv": ([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], False),
            j + "x_block.attn.proj": ([d + "attn.to_out.0"], False),
            j + "x_block.mlp.fc1": ([d + "ff.net.0.proj"], False),
            j + "x_block.mlp.fc2": ([d + "ff.net.2"], False),
            j + "x_block.adaLN_modulation.1": ([d + "norm1.linear"], False),
            j + "context_block.attn.qkv": ([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
                                           False),
            j + "context_block.adaLN_modulation.1": ([d + "norm1_context.linear"], last),  # trap 1: last swapped
        })
        if not last:
            t.update({j + "context_block.attn.proj": ([d + "attn.to_add_out"], False),
                      j + "context_block.mlp.fc1": ([d + "ff_context.net.0.proj"], False),
                      j + "context_block.mlp.fc2": ([d + "ff_context.net.2"], False)})
        if i in attn2:  # trap 2: SD3.5-Medium's second attention
            t.update({j + "x_block.attn2.qkv": ([d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], False),
                      j + "x_block.attn2.proj": ([d + "attn2.to_out.0"], False)})
        if qk_norm:
            t.update({j + "x_block.attn.ln_q": ([d + "attn.norm_q"], False),
                      j + "context_block.attn.ln_k": ([d + "attn.norm_added_k"], False)})
    return t


def table_of(transformer: torch.nn.Module) -> Table:
    cfg = transformer.config  # type: ignore[attr-defined]
    return sai_table(cfg.num_layers, tuple(cfg.dual_attention_layers or ()), bool(cfg.qk_norm))


def reference_deltas(transformer: torch.nn.Module, sai: str, leaves: Mapping[str, torch.Tensor], strength: float,
                     table: Table) -> dict[str, torch.Tensor]:
    """diffusers module → ΔW (fp32) of one SAI layer: computed on the fused weight rebuilt from the model, swapped
    back where SAI swaps, cut into the parts' rows."""
    from tests.flux_factories import reference_deltas as rows_of

    return rows_of(transformer, sai, leaves, strength, table)


def sai_lora(transformer: torch.nn.Module, kind: str | Callable[[str], str | None], rank: int = 4,
             seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """SAI module → leaves of ``kind`` at the fused shape, for every module of the table (norms skipped unless
    ``kind`` names one)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for sai, (parts, swap) in table_of(transformer).items():
        k = kind(sai) if callable(kind) else (None if ".ln_" in sai else kind)
        if k is None:
            continue
        shape = tuple(fused_weight(transformer, parts, swap).shape)
        out[sai] = adapter_tensors(k, shape, rank, gen)
    return out


def kohya_keys(layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"lora_unet_{sai.replace('.', '_')}.{leaf}": t for sai, leaves in layers.items()
            for leaf, t in leaves.items()}


def split_to_diffusers(transformer: torch.nn.Module, layers: Mapping[str, Mapping[str, torch.Tensor]]
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """A SAI plain-LoRA file as the diffusers layout writes it: q, k, v apart, ``down`` shared, rows of ``up``
    (and of a bias); the swapped layers' halves swapped on ``up``."""
    table, out = table_of(transformer), {}
    for sai, leaves in layers.items():
        parts, swap = table[sai]
        up = leaves["lora_up.weight"]
        if swap:
            a, b = up.chunk(2)
            up = torch.cat([b, a])
        for part, u in zip(parts, torch.chunk(up, len(parts))):
            out[part] = {**leaves, "lora_up.weight": u.clone()}
    return out


def sai_state(tr: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A tiny transformer's weights in SAI names (a SAI single file's transformer), by the test's own table."""
    out: dict[str, torch.Tensor] = {}
    done = set()
    table = table_of(tr)
    cfg = tr.config  # type: ignore[attr-defined]
    norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
    for sai, (parts, swap) in table.items():
        if ".ln_" in sai:
            continue
        for param in ("weight", "bias"):
            t = torch.cat([tr.get_submodule(p).get_parameter(param).detach() for p in parts])
            if swap:
                a, b = t.chunk(2)
                t = torch.cat([b, a])
            out[f"{sai}.{param}"] = t.clone()
        done.update(parts)
    for name, p in tr.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in done:
            continue
        _, i, sub = module.split(".", 2)
        out[f"joint_blocks.{i}.{norms[sub]}.weight"] = p.detach().clone()
    out["pos_embed"] = tr.pos_embed.pos_embed.detach().clone()  # type: ignore[union-attr]
    assert cfg.num_layers >= 1
    return out


def tiny_sd3_pipeline(seed: int = 0, medium35: bool = False) -> object:
    """A tiny StableDiffusion3Pipeline (diffusers' test config, 2 blocks): a 3-level VAE (÷4: a 64 px picture is 256
    tokens) with SD3's 16 latent channels (diffusers' inpainting pipeline takes 16 or 33),
    CLIP-L / CLIP-G / T5 from configs, the project's CLIP tokenizer for all three (T5's vocabulary is the CLIP one's
    size), the flow-matching scheduler with SD3's shift 3.0."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from lorakit.generate.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=16,
                        norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                        sample_size=32)
    parts = tiny_sd3_components(seed, medium35=medium35, channels=16)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=parts["text_encoder"], tokenizer=clip_tokenizer(),
                                    text_encoder_2=parts["text_encoder_2"], tokenizer_2=clip_tokenizer(),
                                    text_encoder_3=parts["text_encoder_3"], tokenizer_3=clip_tokenizer(),
                                    transformer=parts["transformer"])
