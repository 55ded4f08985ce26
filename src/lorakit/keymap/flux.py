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
from collections.abc import Callable
from dataclasses import dataclass

from .names import COMPOUNDS, Vocabulary

Pieces = tuple[tuple[int, int], ...]  # source row ranges, in the target's row order

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


@dataclass(frozen=True)
class Fused:
    """An original-layout module that is several model modules stacked along the rows (``targets`` in row order).
    ``rest_last``: every target but the last has the hidden width's rows, the last the rows left (``linear1``'s
    MLP part); otherwise all targets are equal. ``swap``: one target whose halves are swapped."""

    targets: tuple[str, ...]
    rest_last: bool = False
    swap: bool = False

    def pieces(self, rows: int, hidden: int | None) -> list[tuple[str, Pieces]] | str:
        """Each target with its source row ranges, or the reason the rows cannot be split."""
        n = len(self.targets)
        if self.swap:
            if rows % 2:
                return f"{rows} rows cannot be two swapped halves"
            h = rows // 2
            return [(self.targets[0], ((h, rows), (0, h)))]
        if self.rest_last:
            if hidden is None:
                return "the hidden width is unknown (no layer of the file shows its input width)"
            if rows <= (n - 1) * hidden:
                return f"{rows} rows leave nothing for {self.targets[-1]} after {n - 1}×{hidden}"
            edges = [i * hidden for i in range(n)] + [rows]
        else:
            if rows % n or (hidden is not None and rows != n * hidden):
                want = f"{n}×{hidden} = {n * hidden}" if hidden is not None else f"a multiple of {n}"
                return f"{rows} rows, expected {want}"
            edges = [i * rows // n for i in range(n + 1)]
        return [(t, ((edges[i], edges[i + 1]),)) for i, t in enumerate(self.targets)]


Target = str | Fused  # a model module path, or several

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
# diffusers modules whose output is the hidden state (their output width is the hidden width)
HIDDEN_OUTPUTS = ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2", "x_embedder",
                  "context_embedder")
_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")
BFL_HEADS = ("double_blocks", "single_blocks", "final_layer", "img_in", "txt_in", "time_in", "vector_in",
             "guidance_in")


DIFFUSERS_HEADS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                   "time_text_embed", "norm_out", "proj_out")  # FluxTransformer2DModel's top-level modules


def is_bfl_path(path: str) -> bool:
    """Whether a transformer module path is in the original (BFL) layout."""
    return path.split(".", 1)[0] in BFL_HEADS


def to_model(path: str) -> Target | None:
    """The diffusers module(s) of an original-layout module path; ``None`` when the name is not FLUX.1's."""
    m = _BLOCK.fullmatch(path)
    if m is None:
        return _TOP.get(path)
    kind, index, rest = m[1], m[2], m[3]
    target = (_DOUBLE if kind == "double" else _SINGLE).get(rest)
    prefix = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}."
    if target is None:
        return None
    if isinstance(target, str):
        return prefix + target
    return Fused(tuple(prefix + t for t in target.targets), target.rest_last, target.swap)


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


# -- the way back: diffusers module → its BFL name (writers of the original layout) -----------------------------------
_READ_ONLY = re.compile(r"(?:img_attn\.qkv|txt_attn\.qkv|linear1)\.\d|linear1_qkv")


def _inverse() -> tuple[dict[str, str], dict[str, tuple[str, Fused, int]]]:
    """Model module (block index as ``{}``) → its one-to-one BFL name; and → (fused BFL module, its ``Fused``, the
    part's index) for the parts of a fused layer. OneTrainer's one-part names (``qkv.1``) and XLabs' partial
    ``linear1_qkv`` are aliases for reading only: a BFL file has neither."""
    plain: dict[str, str] = {}
    parts: dict[str, tuple[str, Fused, int]] = {}
    tables = (("", "", _TOP), ("double_blocks.{}.", "transformer_blocks.{}.", _DOUBLE),
              ("single_blocks.{}.", "single_transformer_blocks.{}.", _SINGLE))
    for bfl_prefix, model_prefix, table in tables:
        for bfl, target in table.items():
            if _READ_ONLY.fullmatch(bfl):
                continue
            if isinstance(target, str):
                plain[model_prefix + target] = bfl_prefix + bfl
                continue
            whole = Fused(tuple(model_prefix + t for t in target.targets), target.rest_last, target.swap)
            for i, t in enumerate(target.targets):
                parts[model_prefix + t] = (bfl_prefix + bfl, whole, i)
    return plain, parts


_PLAIN_BACK, _PARTS_BACK = _inverse()
_MODEL_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def _templated(path: str) -> tuple[str, str | None]:
    """``transformer_blocks.3.attn.to_q`` → (``transformer_blocks.{}.attn.to_q``, ``3``)."""
    m = _MODEL_BLOCK.fullmatch(path)
    return (path, None) if m is None else (f"{m[1]}.{{}}.{m[3]}", m[2])


def to_original(path: str) -> str | None:
    """The BFL module of a diffusers ``FluxTransformer2DModel`` module when one is the other renamed
    (``transformer_blocks.0.attn.to_out.0`` → ``double_blocks.0.img_attn.proj``); ``None`` for a part of a fused
    layer (``fused_home``) or a name that is not FLUX.1's."""
    template, index = _templated(path)
    found = _PLAIN_BACK.get(template)
    return None if found is None else found.format(index)


def fused_home(path: str) -> tuple[str, Fused, int] | None:
    """For a diffusers module that is some rows of a fused BFL layer: (the BFL module, its ``Fused`` with the model
    paths of every part in row order, this part's index); ``None`` otherwise."""
    template, index = _templated(path)
    found = _PARTS_BACK.get(template)
    if found is None:
        return None
    bfl, fused, i = found
    return bfl.format(index), Fused(tuple(t.format(index) for t in fused.targets), fused.rest_last, fused.swap), i


def is_written(path: str) -> bool:
    """Whether a BFL module path is one a BFL model has (``double_blocks.0.img_attn.qkv``), not a name only some
    readers take (XLabs' ``linear1_qkv``, OneTrainer's ``qkv.1``)."""
    m = _BLOCK.fullmatch(path)
    return to_model(path) is not None and (m is None or not _READ_ONLY.fullmatch(m[3]))


@dataclass(frozen=True)
class Layout:
    """A family's original (checkpoint) layout beside the model's diffusers one, as the tools and trainers need it:
    ``to_model`` (original module → model module(s)), ``is_original`` (a path in the original layout),
    ``to_original`` (a renamed model module → its original name), ``fused_home`` (a model module that is rows of a
    fused original layer → that layer), ``is_written`` (an original path a checkpoint of the family has, not a
    reader-only alias). FLUX.1's is ``LAYOUT``; Chroma's extends it (``keymap/chroma.py``)."""

    to_model: Callable[[str], Target | None]
    is_original: Callable[[str], bool]
    to_original: Callable[[str], str | None]
    fused_home: Callable[[str], tuple[str, Fused, int] | None]
    is_written: Callable[[str], bool]


LAYOUT = Layout(to_model, is_bfl_path, to_original, fused_home, is_written)
