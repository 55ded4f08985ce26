"""The offline CLIP tokenizer and A1111 emphasis parsing."""
from __future__ import annotations

import pytest

from lorakit.emphasis import parse_emphasis
from lorakit.tokenizer import PAD_OPENCLIP, clip_tokenizer


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
