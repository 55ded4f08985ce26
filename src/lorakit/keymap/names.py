"""Turn kohya's underscore-flattened module names back into dotted module paths.

kohya writes ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` as
``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``. Module names themselves contain underscores,
so the inverse needs the vocabulary of multi-word attribute names used by diffusers' UNet, transformers' CLIP and
the LDM/SGM checkpoints; everything else is one token per segment.
"""
from __future__ import annotations

# Attribute names with underscores, diffusers UNet2DConditionModel + transformers CLIP + LDM/SGM UNet.
COMPOUNDS: tuple[str, ...] = (
    # diffusers UNet
    "conv_in", "conv_out", "conv_norm_out", "conv_act", "conv_shortcut", "time_proj", "time_embedding",
    "time_emb_proj", "linear_1", "linear_2", "down_blocks", "up_blocks", "mid_block", "transformer_blocks",
    "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out", "add_embedding", "add_time_proj",
    "add_k_proj", "add_v_proj", "class_embedding", "encoder_hid_proj",
    # transformers CLIP
    "text_model", "token_embedding", "position_embedding", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "layer_norm1", "layer_norm2", "final_layer_norm", "text_projection",
    # LDM / SGM UNet
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
)


class Vocabulary:
    """The multi-word attribute names of one model family's modules, for ``unflatten``."""

    def __init__(self, compounds: tuple[str, ...]) -> None:
        self.compounds = compounds
        self._by_tokens: dict[tuple[str, ...], str] = {tuple(c.split("_")): c for c in compounds}
        self._max = max(len(k) for k in self._by_tokens)

    def unflatten(self, flat: str) -> str:
        """``down_blocks_0_attentions_0_proj_in`` → ``down_blocks.0.attentions.0.proj_in`` (longest match
        first)."""
        tokens = flat.split("_")
        out: list[str] = []
        i = 0
        while i < len(tokens):
            for n in range(min(self._max, len(tokens) - i), 1, -1):
                word = self._by_tokens.get(tuple(tokens[i:i + n]))
                if word:
                    out.append(word)
                    i += n
                    break
            else:
                out.append(tokens[i])
                i += 1
        return ".".join(out)


SD_VOCABULARY = Vocabulary(COMPOUNDS)


def unflatten(flat: str) -> str:
    """Stable Diffusion's names (UNet, CLIP, LDM): ``down_blocks_0_attentions_0_proj_in`` →
    ``down_blocks.0.attentions.0.proj_in``."""
    return SD_VOCABULARY.unflatten(flat)


def canonical_te_path(path: str) -> str:
    """Text-encoder paths without the ``text_model.`` level (transformers 5 ``CLIPTextModel`` has none; the
    resolver adds it back for models that do)."""
    return path[len("text_model."):] if path.startswith("text_model.") else path
