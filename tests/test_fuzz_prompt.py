"""Fuzzing the two prompt parsers with hypothesis: ``parse_prompt`` (LoRA tags) lets only ``PromptSyntaxError``s
escape and gives finite weights that ``spec``/``as_weight`` accept; ``parse_emphasis`` never raises and agrees,
character by character, with A1111's algorithm (transcribed below, with lorakit's documented differences).

A few hundred cases run in the normal suite (fixed examples: the same cases every run); ``--fuzz`` / ``-m fuzz``
runs ``FULL`` random cases per target.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.errors import LorakitError
from lorakit.generate.emphasis import parse_emphasis
from lorakit.prompt import PromptSyntaxError, Schedule, parse_prompt

FAST, FULL = 400, 10_000


def run(check: Callable[[str], None], texts: st.SearchStrategy[str], cases: int) -> None:
    """``check`` over ``cases`` texts; the fast subset is derandomized (a fixed set, so it cannot flake)."""
    options = settings(max_examples=cases, deadline=None, database=None, derandomize=cases == FAST,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    options(given(texts)(check))()


# --- parse_prompt --------------------------------------------------------------------------------------------------

ODD_NUMBERS = ["nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e-400", "²", "①", "١", "1_0", ".", "-", "+",
               "1.1.1", "0x10", " 1 ", "", "9" * 5000, "0", "00", "-0", "1e", "e1", "1@", "@1", "1@2@3", "~"]
TAG_PIECES = st.sampled_from(["<lora:", "<lyco:", "<LoRA:", "<hypernet:", "withLora(", ">", ")", ":", "=", "@",
                              ",", ";", "~", "x", "demo", " ", "te", "unet", "dyn", "lbw", "in", "mid", "out",
                              "start", "stop", "0.5", "-1", "OUTD", "\n", "\\", "(", "[", "]", "BREAK", "\ud800",
                              "\x00", *ODD_NUMBERS])
NUMBERS = st.one_of(st.floats().map(repr), st.integers().map(str), st.sampled_from(ODD_NUMBERS),
                    st.text(max_size=6))
KEYS = st.sampled_from(["te", "unet", "dyn", "in", "mid", "out", "lbw", "start", "stop", "foo", "", "TE"])
VALUES = st.one_of(NUMBERS, st.lists(st.tuples(NUMBERS, NUMBERS).map("@".join), min_size=1, max_size=4).map(
    ",".join), st.lists(NUMBERS, min_size=1, max_size=26).map(",".join))
ARGS = st.one_of(NUMBERS, st.tuples(KEYS, VALUES).map("=".join))
TAGS = st.builds(lambda kind, name, args, close: f"<{kind}:{name}{''.join(':' + a for a in args)}{close}",
                 st.sampled_from(["lora", "lyco", "LORA", "hypernet"]), st.text(max_size=8),
                 st.lists(ARGS, max_size=5), st.sampled_from([">", ">", "", ")"]))
INVOKE = st.builds(lambda name, weight: f"withLora({name}{weight})", st.text(max_size=8),
                   st.one_of(st.just(""), NUMBERS.map(lambda n: "," + n)))
PROMPTS = st.one_of(
    st.text(),
    st.lists(TAG_PIECES, max_size=40).map("".join),
    st.lists(st.one_of(TAGS, INVOKE, st.text(max_size=10)), max_size=6).map(" ".join),
)


def check_prompt(text: str) -> None:
    try:
        parsed = parse_prompt(text)
    except PromptSyntaxError as e:
        assert 1 <= e.column <= len(text) + 1 and f"column {e.column}" in str(e)
        return
    assert len(parsed.text) <= len(text)
    for ref in parsed.loras:
        values = [v for v in (ref.te, ref.unet) if not isinstance(v, Schedule)]
        values += [p for v in (ref.te, ref.unet) if isinstance(v, Schedule) for point in v.points for p in point]
        values += [w for _, w in ref.blocks] + [p for p in (ref.start, ref.stop) if p is not None]
        assert all(math.isfinite(v) for v in values), ref
        assert ref.dyn is None or ref.dyn >= 1
        for step in (None, 1, 7):
            spec = ref.spec(step, 7 if step else None)
            try:
                lorakit.as_weight(spec)
            except LorakitError:
                pass  # e.g. an lbw list of 5 values: a clear error, raised at apply time


def test_parse_prompt_fuzz_fast() -> None:
    run(check_prompt, PROMPTS, FAST)


@pytest.mark.fuzz
def test_parse_prompt_fuzz() -> None:
    run(check_prompt, PROMPTS, FULL)


# --- parse_emphasis ------------------------------------------------------------------------------------------------

A1111_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
WEIGHT = re.compile(r"[+-]?(?:[0-9]{1,300}(?:\.[0-9]{0,300})?|\.[0-9]{1,300})")


def a1111_attention(text: str) -> list[tuple[str, float]]:
    """A1111's ``parse_prompt_attention`` (quadratic; small inputs only), with lorakit's documented differences:
    a weight that is not a plain ASCII decimal is text (A1111 raises), BREAK keeps its -1 inside brackets."""
    res: list[list[Any]] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply_range(start: int, factor: float) -> None:
        for piece in res[start:]:
            if piece[0] is not None:  # None: BREAK
                piece[1] *= factor

    def add_text(token: str) -> None:
        for i, part in enumerate(A1111_BREAK.split(token)):
            if i:
                res.append([None, -1.0])
            res.append([part, 1.0])

    for m in A1111_TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(res))
        elif token == "[":
            squares.append(len(res))
        elif weight is not None and rounds and WEIGHT.fullmatch(weight):
            multiply_range(rounds.pop(), float(weight))
        elif weight is not None and rounds:  # a malformed weight: its text, then the ")" that closes
            add_text(token[:-1])
            multiply_range(rounds.pop(), 1.1)
        elif token == ")" and rounds:
            multiply_range(rounds.pop(), 1.1)
        elif token == "]" and squares:
            multiply_range(squares.pop(), 1 / 1.1)
        else:
            add_text(token)
    for pos in rounds:
        multiply_range(pos, 1.1)
    for pos in squares:
        multiply_range(pos, 1 / 1.1)
    return [("BREAK", -1.0) if t is None else (t, w) for t, w in res]


def per_character(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """One (character, weight) per character, ``("BREAK", -1)`` kept: comparable whatever the merging."""
    out: list[tuple[str, float]] = []
    for text, weight in pieces:
        if (text, weight) == ("BREAK", -1.0):
            out.append((text, weight))
        else:
            out.extend((c, weight) for c in text)
    return out


def same_weight(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)


def check_emphasis(text: str) -> None:
    got = parse_emphasis(text)
    assert got and all(isinstance(t, str) and isinstance(w, float) for t, w in got)
    mine, theirs = per_character(got), per_character(a1111_attention(text))
    assert [c for c, _ in mine] == [c for c, _ in theirs]
    assert all(same_weight(a, b) for (_, a), (_, b) in zip(mine, theirs)), (mine, theirs)


EMPHASIS = st.one_of(
    st.text(),
    st.lists(st.sampled_from(["(", ")", "[", "]", ":", "\\", " ", "a", "b", "1", ".", "-", "+", "1.3", "BREAK",
                              "\n", "0.5", "١", "²", "1e3", "9" * 310, "\t", ":1.1.1)", ":.)", ": 2 )"]),
             max_size=60).map("".join),
)


def test_parse_emphasis_fuzz_fast() -> None:
    run(check_emphasis, EMPHASIS, FAST)


@pytest.mark.fuzz
def test_parse_emphasis_fuzz() -> None:
    run(check_emphasis, EMPHASIS, FULL)


def test_reference_is_a1111() -> None:
    """The transcription itself, on A1111's own documented examples."""
    pieces = a1111_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert pieces[1] == ("house", pytest.approx(1.3 * 1.1 * 1.1))
    assert [t for t, _ in a1111_attention("\\(literal\\]")] == ["(", "literal", "]"]
