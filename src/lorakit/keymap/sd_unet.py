"""Structural facts of the SD1/SD2 UNet that some dialects need without a model at hand."""
from __future__ import annotations

ATTN_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")


def sd1_transformer_blocks() -> list[str]:
    """The attention transformer blocks of an SD1/SD2 UNet in module order (down, up, mid — the registration order
    of diffusers' ``UNet2DConditionModel``)."""
    down = [f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)]
    up = [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in range(3)]
    return [f"{b}.transformer_blocks.0" for b in down + up + ["mid_block.attentions.0"]]


def clip_attention_linears(n_layers: int) -> list[str]:
    """``CLIPAttention`` Linear children in registration order (k, v, q, out), layer by layer."""
    return [f"encoder.layers.{i}.self_attn.{p}" for i in range(n_layers) for p in ("k_proj", "v_proj", "q_proj",
                                                                                    "out_proj")]
