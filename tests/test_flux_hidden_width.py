"""A fused FLUX.1 layer whose change does not show its input width (OFT) is split by the hidden width the file's
other **transformer** layers show — never by the text encoders' width (CLIP-L 768 ≠ 3072), however many of them
the file has."""
from __future__ import annotations

import torch

from lorakit.keymap.families import FLUX1
from lorakit.layout import build_layers
from tests.factories import adapter_tensors

H, CLIP = 32, 48  # the transformer's hidden width; a CLIP-L of another width, as the real one (768 vs 3072)


def test_oft_on_linear1_splits_by_the_transformers_width_not_clips() -> None:
    gen = torch.Generator().manual_seed(0)
    groups = {"transformer.single_blocks.0.linear1": adapter_tensors("oft", (3 * H + 4 * H, H), 4, gen),
              "transformer.single_blocks.0.modulation.lin": adapter_tensors("lora", (3 * H, H), 4, gen)}
    for i in range(3):
        for m in ("q_proj", "k_proj", "v_proj"):
            groups[f"text_encoder.encoder.layers.{i}.self_attn.{m}"] = adapter_tensors("lora", (CLIP, CLIP), 4, gen)
    layers, rest = build_layers(groups, FLUX1, "x.safetensors")
    assert not rest
    s = "transformer.single_transformer_blocks.0."
    rows = {p: layers[s + p].widths()[0] for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
    assert rows == {"attn.to_q": H, "attn.to_k": H, "attn.to_v": H, "proj_mlp": 4 * H}
