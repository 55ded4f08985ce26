"""Qwen-Image as data. Its LoRA files name diffusers' ``QwenImageTransformer2DModel`` modules one to one (ComfyUI's
model uses the same names), so there is no original layout and no fused layer:

- 60 blocks ``transformer_blocks.N.`` (h = 3072): ``attn.{to_q,to_k,to_v,to_out.0}`` (image stream),
  ``attn.{add_q_proj,add_k_proj,add_v_proj,to_add_out}`` (text stream), ``img_mlp.net.0.proj``/``img_mlp.net.2``,
  ``txt_mlp.*`` (12288), the modulations ``img_mod.1``/``txt_mod.1`` (6·h rows);
- top level: ``img_in`` (64 inputs), ``txt_in`` (3584: Qwen2.5-VL-7B's width), ``txt_norm``,
  ``time_text_embed.timestep_embedder.linear_1``/``linear_2``, ``norm_out.linear``, ``proj_out``.

Dialects differ only in prefixes and leaves (``families.QWEN_IMAGE``: diffusers ``transformer.``, ComfyUI
``diffusion_model.``, kohya/musubi ``lora_unet_`` with the names flattened by ``_``, OneTrainer's
``transformer.`` + kohya leaves, PEFT ``.default.``, LyCORIS ``lycoris_``).

What tells a Qwen-Image file from FLUX.1's diffusers layout, which shares ``transformer_blocks.N.attn.*``: its own
module names (``img_mlp``, ``txt_mlp``, ``img_mod``, ``txt_mod`` inside a block; ``txt_norm``), or a block index past
FLUX.1's 19 double blocks (``detection.detect``).
"""
from __future__ import annotations

import re

from .layouts import SingleFile, Target
from .names import COMPOUNDS, Vocabulary

VOCABULARY = Vocabulary(COMPOUNDS + (
    "img_mlp", "txt_mlp", "img_mod", "txt_mod", "img_in", "txt_in", "txt_norm", "img_norm1", "img_norm2",
    "txt_norm1", "txt_norm2", "add_q_proj", "to_add_out", "norm_out", "time_text_embed", "timestep_embedder",
    "norm_q", "norm_k", "norm_added_q", "norm_added_k",
))
KEYS = re.compile(r"(?:^|[._])transformer_blocks[._]\d+[._](?:img_mlp|txt_mlp|img_mod|txt_mod)[._]"
                  r"|(?:^|[._])txt_norm[._](?:lora|alpha|diff|lokr|hada|weight)")
BLOCKS = 60  # QwenImageTransformer2DModel's num_layers (Qwen-Image, -Edit, -Edit-2509)
HEADS = ("img_in", "txt_in", "txt_norm", "time_text_embed", "transformer_blocks", "norm_out", "proj_out")


def file_module(path: str) -> Target | None:
    """A Qwen-Image checkpoint's module → the model's: the same name (ComfyUI's model is named as diffusers')."""
    return path if path.split(".", 1)[0] in HEADS else None


# ComfyUI's ``qwen_image_*.safetensors`` (``split_files/diffusion_models``): the transformer alone, bare or under
# ComfyUI's prefix
SINGLE_FILE = SingleFile("QwenImageTransformer2DModel", re.compile(r"^transformer_blocks\.\d+\.img_mod\."),
                         file_module, lambda key: key.split(".", 1)[0] in HEADS)
