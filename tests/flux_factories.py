"""Tiny FLUX.1 models from diffusers' test configs (≥ 2 double and 2 single blocks, so an index off by one shows),
and an independent reference for BFL-layout LoRAs: the BFL → diffusers table written out here by hand, the fused
weight rebuilt from the diffusers modules, the change computed on it, then sliced (and half-swapped)."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import torch

from lorakit.adapters import build_adapter
from lorakit.quant.layers import weight_values
from tests.factories import adapter_tensors

H = 32  # hidden width of the tiny transformer (2 heads × 16)
MLP = 4 * H


def tiny_flux_transformer(seed: int = 0, guidance: bool = True, double: int = 2, single: int = 3,
                          in_channels: int = 4, out_channels: int | None = None) -> torch.nn.Module:
    """``in_channels=8, out_channels=4``: a control model (latents + control image in, latents out)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=double,
                                  num_single_layers=single, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                  guidance_embeds=guidance).eval()


def tiny_clip(seed: int = 1) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, vocab_size=49408,
                                        projection_dim=32)).eval()


def tiny_t5(seed: int = 2) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=2, vocab_size=49408,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)).eval()


def tiny_flux_components(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: object) -> dict[str, torch.nn.Module]:
    out = {"transformer": tiny_flux_transformer(seed, **kw), "text_encoder": tiny_clip(seed + 1),  # type: ignore[arg-type]
           "text_encoder_2": tiny_t5(seed + 2)}
    return {k: v.to(dtype) for k, v in out.items()}


def transformer_forward(tr: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One transformer forward of a 2×2-token picture ``x`` (1, 4, in_channels) with 3 text tokens."""
    g = torch.Generator().manual_seed(7)
    ids = torch.zeros(4, 3)
    ids[:, 1], ids[:, 2] = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    guidance = torch.tensor([3.5]) if tr.config.guidance_embeds else None
    dt = next(tr.parameters()).dtype
    with torch.no_grad():
        return tr(hidden_states=x.to(dt), encoder_hidden_states=torch.randn(1, 3, 32, generator=g).to(dt),
                  pooled_projections=torch.randn(1, 32, generator=g).to(dt), timestep=torch.tensor([0.5]),
                  img_ids=ids, txt_ids=torch.zeros(3, 3), guidance=guidance).sample


# -- the independent reference: BFL module → (diffusers modules in row order, halves swapped) -------------------------
def bfl_table(double: int, single: int) -> dict[str, tuple[list[str], bool]]:
    t: dict[str, tuple[list[str], bool]] = {
        "img_in": (["x_embedder"], False), "txt_in": (["context_embedder"], False),
        "time_in.in_layer": (["time_text_embed.timestep_embedder.linear_1"], False),
        "time_in.out_layer": (["time_text_embed.timestep_embedder.linear_2"], False),
        "vector_in.in_layer": (["time_text_embed.text_embedder.linear_1"], False),
        "vector_in.out_layer": (["time_text_embed.text_embedder.linear_2"], False),
        "guidance_in.in_layer": (["time_text_embed.guidance_embedder.linear_1"], False),
        "guidance_in.out_layer": (["time_text_embed.guidance_embedder.linear_2"], False),
        "final_layer.linear": (["proj_out"], False),
        "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
    }
    for i in range(double):
        d = f"transformer_blocks.{i}."
        t.update({
            f"double_blocks.{i}.img_mod.lin": ([d + "norm1.linear"], False),
            f"double_blocks.{i}.txt_mod.lin": ([d + "norm1_context.linear"], False),
            f"double_blocks.{i}.img_attn.qkv": ([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], False),
            f"double_blocks.{i}.txt_attn.qkv": ([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
                                                False),
            f"double_blocks.{i}.img_attn.proj": ([d + "attn.to_out.0"], False),
            f"double_blocks.{i}.txt_attn.proj": ([d + "attn.to_add_out"], False),
            f"double_blocks.{i}.img_mlp.0": ([d + "ff.net.0.proj"], False),
            f"double_blocks.{i}.img_mlp.2": ([d + "ff.net.2"], False),
            f"double_blocks.{i}.txt_mlp.0": ([d + "ff_context.net.0.proj"], False),
            f"double_blocks.{i}.txt_mlp.2": ([d + "ff_context.net.2"], False),
        })
    for j in range(single):
        s = f"single_transformer_blocks.{j}."
        t.update({
            f"single_blocks.{j}.linear1": ([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], False),
            f"single_blocks.{j}.linear2": ([s + "proj_out"], False),
            f"single_blocks.{j}.modulation.lin": ([s + "norm.linear"], False),
        })
    return t


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def fused_weight(transformer: torch.nn.Module, parts: list[str], swap: bool) -> torch.Tensor:
    """The BFL module's weight rebuilt from its diffusers parts (their values: a quantized part's dequantization,
    never its stored bytes — benchmarks/quant.py sizes LoRAs on quantized models with it)."""
    w = torch.cat([weight_values(transformer.get_submodule(p)).float() for p in parts])
    return _swap(w) if swap else w


def reference_deltas(transformer: torch.nn.Module, bfl: str, leaves: Mapping[str, torch.Tensor], strength: float,
                     table: dict[str, tuple[list[str], bool]]) -> dict[str, torch.Tensor]:
    """diffusers module → ΔW (fp32) of one BFL layer of a LoRA: the change computed on the fused weight (rebuilt
    from the model), swapped back where BFL swaps, and cut into the parts' rows."""
    parts, swap = table[bfl]
    w = fused_weight(transformer, parts, swap)
    adapter, rest = build_adapter(dict(leaves), bfl)
    assert adapter is not None and not rest, rest
    delta = adapter.delta(w, strength)
    if swap:
        delta = _swap(delta)
    sizes = [transformer.get_submodule(p).weight.shape[0] for p in parts]
    return dict(zip(parts, torch.split(delta, sizes)))


def bfl_lora(transformer: torch.nn.Module, kind: str | Callable[[str], str | None], rank: int = 4, seed: int = 0,
             double: int = 2, single: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """BFL module → leaves of ``kind`` at the fused shape, for every module of the table."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for bfl, (parts, swap) in bfl_table(double, single).items():
        k = kind(bfl) if callable(kind) else kind
        if k is None:
            continue
        shape = tuple(fused_weight(transformer, parts, swap).shape)
        out[bfl] = adapter_tensors(k, shape, rank, gen)
    return out


def kohya_keys(layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"lora_unet_{bfl.replace('.', '_')}.{leaf}": t for bfl, leaves in layers.items()
            for leaf, t in leaves.items()}


def tiny_flux_pipeline(seed: int = 0, guidance: bool = True) -> object:
    """A tiny FluxPipeline: the transformer above, a 1-level VAE (16 latent channels packed 2×2 → 64 would be the
    real one; here 1 channel → 4, as diffusers' test), CLIP-L and T5 from configs, the project's CLIP tokenizer for
    both tokenizers (T5's vocabulary is the CLIP one's size), the dev flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    from lorakit.generate.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=1, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                        sample_size=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_clip(seed + 1), tokenizer=clip_tokenizer(),
                        text_encoder_2=tiny_t5(seed + 2), tokenizer_2=clip_tokenizer(),
                        transformer=tiny_flux_transformer(seed, guidance=guidance))


def bfl_state(tr: torch.nn.Module, double: int = 2, single: int = 3) -> dict[str, torch.Tensor]:
    """A tiny transformer's weights in BFL names, by the test's own table (fused rows stacked, halves swapped)."""
    out: dict[str, torch.Tensor] = {}
    done = set()
    for bfl, (parts, swap) in bfl_table(double, single).items():
        for param in ("weight", "bias"):
            t = torch.cat([tr.get_submodule(p).get_parameter(param).detach() for p in parts])
            if swap:
                a, b = t.chunk(2)
                t = torch.cat([b, a])
            out[f"{bfl}.{param}"] = t.clone()
        done.update(parts)
    norms = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
    for name, p in tr.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in done:
            continue
        block, _, rest = module.partition(".")
        i, _, sub = rest.partition(".")
        if block == "transformer_blocks":
            stream = "img" if "added" not in sub else "txt"
            kind = "query_norm" if sub.endswith(("norm_q", "norm_added_q")) else "key_norm"
            out[f"double_blocks.{i}.{stream}_attn.norm.{kind}.scale"] = p.detach().clone()
        elif block == "single_transformer_blocks":
            out[f"single_blocks.{i}.{norms[sub]}.scale"] = p.detach().clone()
        else:
            raise AssertionError(f"unmapped {name}")
    return out


def xlabs_keys(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An XLabs (x-flux) file: text ``qkv_lora2`` and image ``proj_lora1`` of double block 0, the single block 1's
    ``qkv_lora`` (linear1's q, k, v rows only); rank 4, no α."""
    return {"double_blocks.0.processor.qkv_lora2.down.weight": torch.randn(4, H, generator=gen),
            "double_blocks.0.processor.qkv_lora2.up.weight": torch.randn(3 * H, 4, generator=gen),
            "double_blocks.0.processor.proj_lora1.down.weight": torch.randn(4, H, generator=gen),
            "double_blocks.0.processor.proj_lora1.up.weight": torch.randn(H, 4, generator=gen),
            "single_blocks.1.processor.qkv_lora.down.weight": torch.randn(4, H, generator=gen),
            "single_blocks.1.processor.qkv_lora.up.weight": torch.randn(3 * H, 4, generator=gen)}


def wide_qkv_lora(seed: int = 5) -> dict[str, torch.Tensor]:
    """A kohya ``qkv`` LoRA of a model twice as wide as the tiny one (for refusals)."""
    g = torch.Generator().manual_seed(seed)
    return {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 2 * H, generator=g),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(6 * H, 2, generator=g)}


def fp8_state(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """BFL weights as ComfyUI writes fp8 files: ``plain`` (fp8, no scales), ``legacy`` (``scaled_fp8`` marker +
    ``scale_weight``) or ``new`` (``comfy_quant`` + ``weight_scale``)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = f"model.diffusion_model.{key}"
        if not (key.endswith(".weight") and t.dim() == 2):
            out[name] = t
            continue
        scale = t.float().abs().max() / 200 if layout != "plain" else torch.tensor(1.0)
        out[name] = (t.float() / scale).to(torch.float8_e4m3fn)
        layer = name.removesuffix(".weight")
        if layout == "legacy":
            out[f"{layer}.scale_weight"] = scale.reshape(())
        elif layout == "new":
            out[f"{layer}.weight_scale"] = scale.reshape(())
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
    if layout == "legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out
