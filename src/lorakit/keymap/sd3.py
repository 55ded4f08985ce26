"""Stable Diffusion 3 / 3.5 as data: the SAI (MMDiT) module names of kohya, ComfyUI and SAI checkpoints → diffusers
``SD3Transformer2DModel`` names (ComfyUI's ``MMDIT_MAP_BLOCK``, diffusers' ``convert_sd3_transformer_checkpoint_to_
diffusers``), the flattened-name vocabulary, what tells an SD3 file from its neighbours, and which of the three sizes
a file or a model is (``SIZES``).

``joint_blocks.i.x_block.attn.qkv`` is ``transformer_blocks.i.attn.to_q``/``to_k``/``to_v`` stacked along the rows
(``context_block``: ``add_q/k/v_proj``; SD3.5-Medium's ``x_block.attn2.qkv``: ``attn2.to_q/k/v``). Two traps: the
**last** block's ``context_block.adaLN_modulation.1`` is 2·h rows with its halves swapped (diffusers'
``AdaLayerNormContinuous`` [scale; shift], SAI [shift; scale]) while every other block's is 6·h and not swapped —
told apart by the rows the layer has, never by a block count; and ``final_layer.adaLN_modulation.1`` is
``norm_out.linear`` swapped, as FLUX.1's. The last block has no ``to_add_out`` and no ``ff_context``.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .arch import Arch
from .layouts import Blocks, Fused, LayoutMap, SingleFile, Target
from .names import COMPOUNDS, Vocabulary

VOCABULARY = Vocabulary(COMPOUNDS + (
    "joint_blocks", "x_block", "context_block", "adaLN_modulation", "x_embedder", "t_embedder", "y_embedder",
    "final_layer", "ln_q", "ln_k", "context_embedder", "pos_embed", "time_text_embed", "timestep_embedder",
    "text_embedder", "norm1_context", "norm_out", "add_q_proj", "to_add_out", "ff_context", "norm_q", "norm_k",
    "norm_added_q", "norm_added_k", "wi_0", "wi_1", "layer_norm", "relative_attention_bias",
))

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_TOP: dict[str, Target] = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": Fused(("norm_out.linear",), swap=True),
}
_JOINT: dict[str, Target] = {
    "x_block.attn.qkv": Fused(_QKV), "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.qkv": Fused(tuple(p.replace("attn.", "attn2.") for p in _QKV)),
    "x_block.attn2.proj": "attn2.to_out.0", "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2", "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.attn.qkv": Fused(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
    "context_block.adaLN_modulation.1": Fused(("norm1_context.linear",), swap=True, swap_only=2),
}
SAI_HEADS = ("joint_blocks", "x_embedder", "t_embedder", "y_embedder", "final_layer", "context_embedder")
MAP = LayoutMap(_TOP, (Blocks("joint_blocks", "transformer_blocks", _JOINT),), SAI_HEADS)
# diffusers modules whose output is the hidden state (their output width is the hidden width)
HIDDEN_OUTPUTS = ("attn.to_out.0", "attn2.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2",
                  "pos_embed.proj", "context_embedder")
DIFFUSERS_HEADS = ("transformer_blocks", "pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out")

# -- what tells SD3 files apart (raw key names, any dialect) ---------------------------------------------------------
KEYS = re.compile(r"(?:^|[._])(?:joint_blocks[._]\d|x_block[._]|context_block[._])")
# diffusers-layout names only SD3 has among the MMDiTs lorakit knows: SD3.5-Medium's second attention, the patch
# embedding (SD3's ``pos_embed.proj``; FLUX.1 has ``x_embedder``). Top-level blocks only (an SD UNet has
# ``transformer_blocks.N.attn2`` inside its ``attentions``), under any dialect's prefix.
DIFFUSERS_KEYS = re.compile(r"^(?:transformer\.|lora_transformer_|base_model\.model\.|lycoris_|lora_unet_|"
                            r"diffusion_model\.)*(?:transformer_blocks[._]\d+[._]attn2[._](?:to_|add_)|pos_embed[._]proj)")
WIDTHS: dict[int, Arch] = {1536: Arch.SD3_MEDIUMS, 2432: Arch.SD35_LARGE}  # hidden width → size
_ATTN2 = re.compile(r"transformer_blocks[._]\d+[._]attn2[._]|x_block[._]attn2[._]")
_QK_NORM = re.compile(r"[._](?:norm_q|norm_k|norm_added_q|norm_added_k|ln_q|ln_k)(?:[._]|$)")
# kohya ``modelspec.architecture`` (stable-diffusion-3-medium, -3-5-large, -3-5-medium), OMI (stable-diffusion-
# v3-medium, -v3.5-large, -v3.5-medium), kohya's ``ss_base_model_version`` model type (medium, 5-large, 5-medium)
_META: tuple[tuple[re.Pattern[str], Arch], ...] = (
    (re.compile(r"3[-._]?5[-._ ]?large|(?:^|\W)5-large"), Arch.SD35_LARGE),
    (re.compile(r"3[-._]?5[-._ ]?medium|(?:^|\W)5-medium"), Arch.SD35_MEDIUM),
    (re.compile(r"(?:3|v3)[-._ ]?medium|^medium$"), Arch.SD3_MEDIUM),
)


def from_metadata(metadata: Mapping[str, str]) -> Arch | None:
    """The size a file's metadata names (``None``: none)."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        text = metadata.get(key, "").strip().lower()
        for pattern, arch in _META:
            if pattern.search(text):
                return arch
    return None


def size_of(hidden: int | None, names: str, metadata: Mapping[str, str]) -> Arch:
    """The SD3 architecture of a LoRA from the hidden width its layers read, its module names (joined) and its
    metadata: 2432 wide is 3.5-Large; a second attention (``attn2``) only 3.5-Medium has; 1536 wide is a Medium —
    3.5 when it changes qk-norms (SD3-Medium has none), else which one the metadata says, else either; a file that
    shows no full-size width (text encoders only, a tiny test model) is what its metadata says, else any size.
    Shapes win over metadata, which is often copied from another run."""
    meta = from_metadata(metadata)
    if hidden == 2432:
        return Arch.SD35_LARGE
    if _ATTN2.search(names):
        return Arch.SD35_MEDIUM
    if hidden == 1536:
        if _QK_NORM.search(names):
            return Arch.SD35_MEDIUM
        return meta if meta in (Arch.SD3_MEDIUM, Arch.SD35_MEDIUM) else Arch.SD3_MEDIUMS
    return meta or Arch.SD3


_NOT_BLOCK_INPUTS = ("context_embedder", "time_text_embed", "pos_embed")  # read text/time/pixels, not the hidden state


class Sizes:
    """Which SD3 size a LoRA (from its layers, or a header's text) or a model (from its config) is."""

    @staticmethod
    def of_layers(layers: Mapping[str, Any], metadata: Mapping[str, str]) -> str:
        """``layers``: model module path → adapter (``widths()`` → (out, in))."""
        widths = Counter(w for p, a in layers.items() if p.startswith("transformer.")
                         and not p.split(".", 2)[1].startswith(_NOT_BLOCK_INPUTS) and (w := a.widths()[1]) is not None)
        hidden = widths.most_common(1)[0][0] if widths else None
        return size_of(hidden, "\n".join(layers), metadata)

    @staticmethod
    def of_header(body: str, metadata: Mapping[str, str]) -> str:
        """``body``: safetensors header entries as compact JSON text (``"key":{"dtype":…,"shape":[…]…``)."""
        widths = Counter(int(m[1]) for m in _DOWN_SHAPE.finditer(body))
        return size_of(widths.most_common(1)[0][0] if widths else None, body, metadata)

    @staticmethod
    def of_model(components: Mapping[str, Any]) -> str:
        """From the transformer's config: 2432 wide (or qk-norm without ``attn2``) is 3.5-Large, ``attn2`` blocks
        3.5-Medium, else SD3-Medium (tiny test models are named by their structure)."""
        cfg = components["transformer"].config
        hidden = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        if hidden == 2432:
            return Arch.SD35_LARGE
        if tuple(getattr(cfg, "dual_attention_layers", ()) or ()):
            return Arch.SD35_MEDIUM
        return Arch.SD35_LARGE if getattr(cfg, "qk_norm", None) and hidden != 1536 else Arch.SD3_MEDIUM


# the down factor of a block layer in a header's text: its second dimension is the hidden width
_DOWN_SHAPE = re.compile(r'(?:joint_blocks|transformer_blocks)[._]\d+[._][^"]*?(?:lora_down|lora_A)(?:\.default)?'
                         r'\.weight":\{"dtype":"\w+","shape":\[\d+,(\d+)\]')
SIZES = Sizes()


def claims(keys: Iterable[str]) -> bool:
    """Whether key names alone say SD3: SAI block names, or diffusers names only SD3 has."""
    return any(KEYS.search(k) or DIFFUSERS_KEYS.search(k) for k in keys)


def file_module(path: str) -> Target | None:
    """A SAI checkpoint's module → the model's: ``MAP``, and the position table (the bare key ``pos_embed``: module
    ``""``, parameter ``pos_embed``) → ``pos_embed`` (its parameter ``pos_embed``)."""
    return "pos_embed" if path == "" else MAP.to_model(path)


# SAI's ``sd3_medium.safetensors``, ``sd3.5_large.safetensors`` (``model.diffusion_model.`` + ``first_stage_model.``,
# with or without ``text_encoders.clip_l|clip_g|t5xxl.transformer.``), or a bare transformer; its width is
# ``x_embedder.proj``'s rows
SINGLE_FILE = SingleFile("SD3Transformer2DModel", re.compile(r"^joint_blocks\.\d+\."), file_module,
                         lambda key: MAP.is_original(key) or key == "pos_embed", renames={"pos_embed": "pos_embed"},
                         text_encoders={"text_encoder": "text_encoders.clip_l.transformer.",
                                        "text_encoder_2": "text_encoders.clip_g.transformer.",
                                        "text_encoder_3": "text_encoders.t5xxl.transformer."},
                         ldm_vae=True, hidden="x_embedder.proj.weight")
