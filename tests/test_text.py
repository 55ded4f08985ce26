"""The offline CLIP tokenizer and A1111 emphasis parsing."""
from __future__ import annotations

import pytest

from lorakit.generate.emphasis import parse_emphasis
from lorakit.generate.tokenizer import PAD_OPENCLIP, clip_tokenizer


def test_tokenizer_offline_ids() -> None:
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    padded = tok("a cat", padding="max_length").input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_openclip_pads_with_exclamation_mark() -> None:
    padded = clip_tokenizer(PAD_OPENCLIP)("a cat", padding="max_length").input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and padded[-1] == 0


A = 1.1
CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", A), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", A)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", A)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * A * A), (" ", A), ("on", 1.0), (" a ", A), ("hill", 0.55), (", sun, ", A),
      ("sky", A ** 4), (".", A)]),
    ("(worst quality, low quality:1.4), (painting by bad-artist-anime:0.9)",
     [("worst quality, low quality", 1.4), (", ", 1.0), ("painting by bad-artist-anime", 0.9)]),
    ("[faded]", [("faded", 1 / A)]),
    ("stray) closer]", [("stray) closer]", 1.0)]),
    ("time:1.2 no bracket", [("time:1.2 no bracket", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b:1.2)", [("a", 1.2), ("BREAK", -1.0), ("b", 1.2)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:30] or "empty" for c in CASES])
def test_a1111_emphasis(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


# --- conditioning: A1111 chunking, emphasis, clip skip ---------------------------------------------------------
import torch  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from lorakit.generate.conditioning import chunk_prompt, encode_pair, encode_prompt  # noqa: E402


def _te(cls: type = CLIPTextModel, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(CLIPTextConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                              vocab_size=49408, max_position_embeddings=77, projection_dim=16)).eval()


@pytest.mark.parametrize("n,sizes", [(1, [1]), (75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1]),
                                     (225, [75, 75, 75])])
def test_chunks_of_75(n: int, sizes: list[int]) -> None:
    assert [len(c.tokens) for c in chunk_prompt(" ".join(["cat"] * n), clip_tokenizer())] == sizes


def test_overflow_cuts_at_a_comma_in_the_last_20_tokens() -> None:
    text = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 30)
    assert [len(c.tokens) for c in chunk_prompt(text, clip_tokenizer())] == [61, 30]
    far = " ".join(["cat"] * 40) + ", " + " ".join(["dog"] * 50)
    assert [len(c.tokens) for c in chunk_prompt(far, clip_tokenizer())] == [75, 16]


def test_break_starts_a_new_chunk() -> None:
    assert [len(c.tokens) for c in chunk_prompt("a red cat BREAK a blue dog", clip_tokenizer())] == [3, 3]


def test_long_prompt_reaches_the_model_as_77_token_chunks() -> None:
    te, tok = _te(), clip_tokenizer()
    pos, neg = encode_pair(" ".join(["cat"] * 200), "ugly", [(te, tok)])
    assert pos.embeds.shape == (1, 3 * 77, 32) and neg.embeds.shape == pos.embeds.shape and pos.chunks == 3


def test_emphasis_one_is_identity_and_other_weights_change() -> None:
    te, tok = _te(), clip_tokenizer()
    plain = encode_prompt("a cat sitting", [(te, tok)]).embeds
    assert torch.equal(encode_prompt("a (cat:1.0) sitting", [(te, tok)]).embeds, plain)
    assert not torch.equal(encode_prompt("a (cat:1.5) sitting", [(te, tok)]).embeds, plain)


def test_clip_skip_uses_an_earlier_layer() -> None:
    te, tok = _te(), clip_tokenizer()
    assert not torch.equal(encode_prompt("a cat", [(te, tok)], clip_skip=2).embeds,
                           encode_prompt("a cat", [(te, tok)]).embeds)


def test_sdxl_two_encoders_side_by_side_with_pooled() -> None:
    tok = clip_tokenizer()
    cond = encode_prompt("a cat", [(_te(), tok), (_te(CLIPTextModelWithProjection, 64), tok)], sdxl=True)
    assert cond.embeds.shape == (1, 77, 32 + 64) and cond.pooled is not None and cond.pooled.shape == (1, 16)
