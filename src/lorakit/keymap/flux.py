"""FLUX.1 as data: the BFL/ComfyUI/kohya module names → diffusers ``FluxTransformer2DModel`` names, with the row
ranges of the fused layers, the flattened-name vocabulary, and what tells a FLUX.1 file from its neighbours.

The original (BFL) layout fuses what diffusers keeps apart: a double block's ``img_attn.qkv`` is ``to_q``/``to_k``/
``to_v`` stacked along the rows, a single block's ``linear1`` is ``to_q``/``to_k``/``to_v``/``proj_mlp``, and the
final layer's ``adaLN_modulation.1`` is ``norm_out.linear`` with its two halves swapped (BFL [shift; scale],
diffusers [scale; shift]). Sizes are never written here: a fused layer's rows are split by the hidden width the
layer itself shows (its input width: every fused layer reads the hidden state), so a tiny test model and the 12 B
one go through the same code; the model's own shapes then check each part (``patch.plan``).
"""
from __future__ import annotations

import re

from .blocks import dit_vector
from .layouts import Blocks, Fused, LayoutMap, Pieces, SingleFile, Target
from .names import COMPOUNDS, Vocabulary

__all__ = ["Fused", "Pieces", "Target", "MAP"]

# Multi-word names of BFL FLUX, diffusers FLUX, T5 and CLIP modules (kohya flattens them with ``_``).
VOCABULARY = Vocabulary(COMPOUNDS + (
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "final_layer", "adaLN_modulation", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer",
    "out_layer", "query_norm", "key_norm", "linear1_qkv",
    "single_transformer_blocks", "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder",
    "guidance_embedder", "text_embedder", "norm1_context", "norm_out", "proj_mlp", "add_q_proj", "to_add_out",
    "ff_context", "norm_q", "norm_k", "norm_added_q", "norm_added_k",
    "wi_0", "wi_1", "layer_norm", "relative_attention_bias",
))

_TOP: dict[str, Target] = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": Fused(("norm_out.linear",), swap=True),
}
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_DOUBLE: dict[str, Target] = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": Fused(_QKV), "txt_attn.qkv": Fused(_ADD_QKV),
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
    **{f"img_attn.qkv.{i}": t for i, t in enumerate(_QKV)},  # OneTrainer's BFL layout: one part each
    **{f"txt_attn.qkv.{i}": t for i, t in enumerate(_ADD_QKV)},
}
_SINGLE: dict[str, Target] = {
    "linear1": Fused(_QKV + ("proj_mlp",), rest_last=True),
    "linear1_qkv": Fused(_QKV),  # XLabs' ``qkv_lora``: the q, k, v rows of linear1 only (ComfyUI's name)
    "linear2": "proj_out", "modulation.lin": "norm.linear",
    "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
    **{f"linear1.{i}": t for i, t in enumerate(_QKV + ("proj_mlp",))},
}
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38  # FLUX.1 dev/schnell/Kontext (Chroma keeps them)
LBW = dit_vector("FLUX.1", DOUBLE_BLOCKS, SINGLE_BLOCKS)  # the 58-value block-weight vector
# diffusers modules whose output is the hidden state (their output width is the hidden width)
HIDDEN_OUTPUTS = ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2", "x_embedder",
                  "context_embedder")
BFL_HEADS = ("double_blocks", "single_blocks", "final_layer", "img_in", "txt_in", "time_in", "vector_in",
             "guidance_in")
DIFFUSERS_HEADS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                   "time_text_embed", "norm_out", "proj_out")  # FluxTransformer2DModel's top-level modules


MAP = LayoutMap(_TOP, (Blocks("double_blocks", "transformer_blocks", _DOUBLE),
                      Blocks("single_blocks", "single_transformer_blocks", _SINGLE)), BFL_HEADS,
                read_only=re.compile(r"(?:img_attn\.qkv|txt_attn\.qkv|linear1)\.\d|linear1_qkv"))
# OneTrainer's one-part names (``qkv.1``) and XLabs' partial ``linear1_qkv`` are read-only aliases: a BFL file has
# neither. ``to_model``: a BFL module path → the diffusers module(s) (``None``: not FLUX.1's); ``to_original``: a
# diffusers module → its BFL name when one is the other renamed; ``fused_home``: a part of a fused BFL layer → (the
# BFL module, its ``Fused``, the part's index); ``is_written``: a BFL name a BFL model has (not an alias).
is_bfl_path, to_model, to_original = MAP.is_original, MAP.to_model, MAP.to_original
fused_home, is_written = MAP.fused_home, MAP.is_written
# BFL's ``flux1-dev.safetensors`` and ComfyUI's all-in-one files (``model.diffusion_model.`` + CLIP-L, T5, VAE); bare
# diffusers names are diffusers-keyed GGUF files' (``models/flux.py`` reads those)
SINGLE_FILE = SingleFile("FluxTransformer2DModel", re.compile(r"^double_blocks\."), to_model,
                         lambda key: is_bfl_path(key) or key.split(".", 1)[0] in DIFFUSERS_HEADS,
                         renames={"scale": "weight"}, ldm_vae=True,
                         text_encoders={"text_encoder": "text_encoders.clip_l.transformer.",
                                        "text_encoder_2": "text_encoders.t5xxl.transformer."})


# -- what tells FLUX.1 files apart (raw key names, any dialect) ----------------------------------------------------
KEYS = re.compile(r"(?:^|[._])(?:double_blocks|single_blocks|single_transformer_blocks)[._]\d|processor[._]qkv_lora"
                  r"|(?:^|[._])final_layer[._]adaLN_modulation|(?:^|[._])(?:img_in|txt_in|vector_in|guidance_in)"
                  r"[._](?:lora|in_layer|out_layer|alpha|diff|lokr|hada)")
# diffusers-layout double blocks alone (``transformer_blocks.N.attn.add_q_proj``) are FLUX.1 or SD3: these settle it.
DIFFUSERS_ONLY = re.compile(r"(?:^|[._])(?:norm1_context[._]linear|ff_context[._]net|proj_mlp|time_text_embed[._]"
                            r"(?:timestep|guidance|text)_embedder|x_embedder|context_embedder)")
CHROMA = re.compile(r"distilled_guidance_layer")
FLUX2 = re.compile(r"to_qkv_mlp_proj|double_stream_modulation|single_stream_modulation|(?:^|[._])ff[._]linear_in")
# Input widths only FLUX.2's text/vector embedders have (Mistral-3 / Qwen-3 text features; InvokeAI's rule).
FLUX2_TEXT_WIDTHS = (7680, 12288, 15360)
TEXT_IN = re.compile(r"(?:^|[._])(?:txt_in|context_embedder)[._]")
GUIDANCE = re.compile(r"(?:^|[._])(?:guidance_in|guidance_embedder)[._]")
IMG_IN = re.compile(r"(?:^|[._])(?:img_in|x_embedder)[._]")
