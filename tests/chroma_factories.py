"""Tiny Chroma models from diffusers' test config (``tests/pipelines/chroma``; here 2 double and 3 single blocks,
h = 32, and a 2-layer approximator), the tiny T5 and VAE of the FLUX.1 tests, and the independent reference for
Chroma-trained files: the BFL → diffusers table of ``tests/flux_factories.py`` less what Chroma pruned, plus the
approximator written out by hand."""
from __future__ import annotations

import torch

from tests.factories import adapter_tensors
from tests.flux_factories import bfl_table, tiny_t5

H = 32
DOUBLE, SINGLE, APPROX = 2, 3, 2
PRUNED = ("img_mod", "txt_mod", "modulation", "time_in", "vector_in", "guidance_in", "final_layer.adaLN")


def tiny_chroma_transformer(seed: int = 0) -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=DOUBLE, num_single_layers=SINGLE,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
                                    approximator_layers=APPROX, approximator_num_channels=16).eval()


def tiny_chroma_pipeline(seed: int = 0) -> object:
    """A tiny ChromaPipeline: the transformer above, FLUX.1's tiny VAE and T5, the project's CLIP tokenizer standing
    in for T5's (the same vocabulary size), FLUX.1-schnell's flow-matching scheduler."""
    from diffusers import AutoencoderKL, ChromaPipeline, FlowMatchEulerDiscreteScheduler

    from lorakit.generate.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=1, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                        sample_size=32)
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=tiny_t5(seed + 2),
                          tokenizer=clip_tokenizer(), transformer=tiny_chroma_transformer(seed))


def chroma_table() -> dict[str, tuple[list[str], bool]]:
    """BFL module → (diffusers modules in row order, halves swapped) of a Chroma model: FLUX.1's table less the
    pruned modules, plus the approximator (``in_layer``/``out_layer`` = ``linear_1``/``linear_2``)."""
    table = {b: v for b, v in bfl_table(DOUBLE, SINGLE).items() if not any(p in b for p in PRUNED)}
    g = "distilled_guidance_layer"
    table.update({f"{g}.in_proj": ([f"{g}.in_proj"], False), f"{g}.out_proj": ([f"{g}.out_proj"], False)})
    for i in range(APPROX):
        table[f"{g}.layers.{i}.in_layer"] = ([f"{g}.layers.{i}.linear_1"], False)
        table[f"{g}.layers.{i}.out_layer"] = ([f"{g}.layers.{i}.linear_2"], False)
    return table


def chroma_lora(transformer: torch.nn.Module, kind: str, rank: int = 4,
                seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """BFL module → leaves of ``kind`` at the fused shape, for every module of ``chroma_table``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for bfl, (parts, _) in chroma_table().items():
        rows = sum(int(transformer.get_submodule(p).weight.shape[0]) for p in parts)
        cols = int(transformer.get_submodule(parts[0]).weight.shape[1])
        out[bfl] = adapter_tensors(kind, (rows, cols), rank, gen)
    return out


def chroma_bfl_state(tr: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A tiny Chroma transformer's weights in lodestones' BFL names, by the table above (fused rows stacked), the
    RMSNorms' ``weight`` as BFL's ``scale``."""
    out: dict[str, torch.Tensor] = {}
    done = set()
    for bfl, (parts, _) in chroma_table().items():
        for param in ("weight", "bias"):
            out[f"{bfl}.{param}"] = torch.cat([tr.get_submodule(p).get_parameter(param).detach() for p in parts])
        done.update(parts)
    norms = {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
             "norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}
    for name, p in tr.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in done:
            continue
        head, i, sub = (module.split(".", 2) + ["", ""])[:3]
        if head == "transformer_blocks":
            out[f"double_blocks.{i}.{norms[sub.removeprefix('attn.')]}.scale"] = p.detach().clone()
        elif head == "single_transformer_blocks":
            out[f"single_blocks.{i}.norm.{'query' if sub.endswith('q') else 'key'}_norm.scale"] = p.detach().clone()
        elif module.startswith("distilled_guidance_layer.norms."):
            out[f"{module}.scale"] = p.detach().clone()
        else:
            raise AssertionError(f"unmapped {name}")
    return out
