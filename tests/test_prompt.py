"""Every syntax form of docs/prompt-syntax.md, table-driven; malformed tags; both prompt parsers in linear time."""
from __future__ import annotations

import gc
import time
from collections.abc import Callable

import pytest

import lorakit
from lorakit.generate.emphasis import parse_emphasis
from lorakit.prompt import LoraRef, PromptSyntaxError, Schedule, parse_prompt

CASES: list[tuple[str, str, list[dict[str, object]]]] = [
    ("a cat <lora:ink>", "a cat", [dict(name="ink", te=1.0, unet=1.0)]),
    ("<lora:ink:0.8> a cat", "a cat", [dict(name="ink", te=0.8, unet=0.8)]),
    ("<lora:ink:0.8:0.3>", "", [dict(name="ink", te=0.8, unet=0.3)]),
    ("<lora:ink:0.8:0.3:16>", "", [dict(name="ink", te=0.8, unet=0.3, dyn=16)]),
    ("<lora:test_lora:te=0.5:unet=1.5>", "", [dict(name="test_lora", te=0.5, unet=1.5)]),
    ("<lora:ink:1:dyn=4>", "", [dict(name="ink", dyn=4)]),
    ("<lora:test_lora:1.0:in=0:mid=1:out=0>", "",
     [dict(name="test_lora", blocks=(("in", 0.0), ("mid", 1.0), ("out", 0.0)))]),
    ("<lora:ink:lbw=OUTD>", "", [dict(name="ink", lbw="OUTD")]),
    ("<lora:ink:lbw=outs>", "", [dict(name="ink", lbw="OUTS")]),
    ("<lora:ink:0.7:lbw=1,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1>", "",
     [dict(name="ink", te=0.7, lbw="1,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1")]),
    ("<lora:test_lora:te=0.1@1,0.6@6>", "",
     [dict(name="test_lora", te=Schedule(((1.0, 0.1), (6.0, 0.6))), unet=1.0)]),
    ("<lora:ink:unet=0@0,1@0.5>", "", [dict(name="ink", unet=Schedule(((0.0, 0.0), (0.5, 1.0))))]),
    ("<lora:ink:1:start=0.25:stop=10>", "", [dict(name="ink", start=0.25, stop=10.0)]),
    ("<lyco:style/ink:0.7>", "", [dict(name="style/ink", te=0.7, unet=0.7, syntax="lyco")]),
    ("family sitting at dinner table withLora(parchment_people,0.9)", "family sitting at dinner table",
     [dict(name="parchment_people", te=0.9, unet=0.9, syntax="invokeai")]),
    ("withLora(parchment_people) x", "x", [dict(name="parchment_people", te=1.0, syntax="invokeai")]),
    ("(shukezouma:0.5) ,<lora:Moxin_Shukezouma:1> , chinese painting", "(shukezouma:0.5) , , chinese painting",
     [dict(name="Moxin_Shukezouma", column=19)]),
    ("<lora:a:0.5> and <lora:b:1.2> and withLora(c,0.3)", "and and",
     [dict(name="a", te=0.5), dict(name="b", te=1.2), dict(name="c", te=0.3)]),
    ("<lora:My LoRA v2.1:0.5>", "", [dict(name="My LoRA v2.1", te=0.5)]),
    ("<lora:neg:-1>", "", [dict(name="neg", te=-1.0, unet=-1.0)]),
    ("no tags here", "no tags here", []),
]


@pytest.mark.parametrize("text,clean,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_syntax_forms(text: str, clean: str, expected: list[dict[str, object]]) -> None:
    parsed = parse_prompt(text)
    assert parsed.text == clean
    assert len(parsed.loras) == len(expected)
    for ref, want in zip(parsed.loras, expected):
        for key, value in want.items():
            assert getattr(ref, key) == value, (key, getattr(ref, key), value)


def test_other_tags_are_left_with_a_warning() -> None:
    parsed = parse_prompt("<hypernet:x:1> a <lora:ink>")
    assert parsed.text == "<hypernet:x:1> a" and [r.name for r in parsed.loras] == ["ink"]
    assert parsed.warnings == ["column 1: <hypernet:…> is not a LoRA tag; left in the prompt"]


def test_negative_prompt_marks_refs() -> None:
    assert parse_prompt("<lora:bad:1>", negative=True).loras[0].negative


@pytest.mark.parametrize("text,column,message", [
    ("a <lora:x:abc>", 11, "expected a number"),
    ("a <lora:x:foo=1>", 11, "unknown LoRA argument 'foo'"),
    ("a <lora:x", 3, "not closed"),
    ("withLora(a,zz)", 12, "expected a number"),
    ("<lora::1>", 7, "name is empty"),
    ("<lora:x:1:1:1:1>", 15, "at most three positional"),
    ("<lora:x:dyn=0>", 13, "dyn must be"),
    ("<lora:x:te=0.1@1,0.6>", 18, "value@position"),
    ("withLora(a", 1, "not closed"),
    # digits str.isdigit() accepts and int() refuses; a rank no file has
    ("<lora:x:1:1:²>", 13, "dyn must be a positive whole number, got '²'"),
    ("<lora:x:dyn=①>", 13, "dyn must be a positive whole number, got '①'"),
    ("<lora:x:dyn=" + "9" * 5000 + ">", 13, r"dyn must be .* \(5000 characters\)"),
    # weights that are not finite numbers
    ("<lora:x:nan>", 9, "expected a number, got 'nan'"),
    ("<lora:x:inf>", 9, "expected a number, got 'inf'"),
    ("<lora:x:0.5:-inf>", 13, "expected a number, got '-inf'"),
    ("<lora:x:1e400>", 9, "expected a finite number, got '1e400'"),
    ("<lora:x:te=Infinity>", 12, "expected a number"),
    ("<lora:x:1:start=nan>", 17, "expected a number"),
    ("<lora:x:lbw=1,nan,1>", 13, "expected a number"),
    ("withLora(a,1e999)", 12, "expected a finite number"),
    ("<lora:x:1_0>", 9, "expected a number"),  # float() reads "1_0" as 10; A1111 users never write it
])
def test_syntax_errors_name_the_column(text: str, column: int, message: str) -> None:
    with pytest.raises(PromptSyntaxError, match=message) as info:
        parse_prompt(text)
    assert info.value.column == column and f"column {column}" in str(info.value)
    assert isinstance(info.value, lorakit.LorakitError)


@pytest.mark.parametrize("step,value", [(1, 0.1), (2, 0.2), (6, 0.6), (8, 0.6)])
def test_schedule_interpolates_between_steps(step: int, value: float) -> None:
    assert Schedule(((1.0, 0.1), (6.0, 0.6))).at(step, total=8) == pytest.approx(value)


def test_schedule_alternative_separators() -> None:
    assert parse_prompt("<lora:x:te=0~0;1~10>").loras[0].te == Schedule(((0.0, 0.0), (10.0, 1.0)))


def test_schedule_fractions_of_total_steps() -> None:
    s = Schedule(((0.0, 0.0), (0.5, 1.0)))
    assert s.at(5, total=10) == pytest.approx(1.0) and s.at(2, total=10) == pytest.approx(0.4)


def test_spec_feeds_apply_loras_weights() -> None:
    ref = parse_prompt("<lora:x:te=0.1@1,0.6@6:unet=0.5:in=0:start=2:stop=5>").loras[0]
    assert ref.scheduled
    assert ref.spec(step=1, total=10) == {"te": 0.0, "unet": 0.0, "in": 0.0}
    spec = ref.spec(step=3, total=10)
    assert spec["te"] == pytest.approx(0.3) and spec["unet"] == 0.5
    w = lorakit.as_weight(spec)
    assert w.te == pytest.approx(0.3) and w.blocks["IN04"] == 0.0
    assert not LoraRef("y").scheduled and LoraRef("y").spec() == {"te": 1.0, "unet": 1.0}


def test_error_message_shows_the_spot_not_the_whole_prompt() -> None:
    text = "word " * 20_000 + "<lora:x:nan> " + "more " * 20_000
    with pytest.raises(PromptSyntaxError) as info:
        parse_prompt(text)
    column = 5 * 20_000 + 9
    message = str(info.value)
    assert info.value.column == column and len(message) < 400, message
    lines = message.splitlines()
    assert lines[1].index("nan") == lines[2].index("^")  # the caret is under the value


def test_warnings_for_other_tags_are_capped() -> None:
    parsed = parse_prompt("<a:" * 1000)
    assert len(parsed.warnings) == 11 and parsed.warnings[-1] == "… and 990 more tags that are not LoRA tags"
    assert parsed.text == "<a:" * 1000


def test_numbers_as_a1111_users_write_them() -> None:
    refs = parse_prompt("<lora:a:.5> <lora:b:-1.> <lora:c:+2> <lora:d:1e-1:0:007>").loras
    assert [(r.te, r.unet) for r in refs] == [(0.5, 0.5), (-1.0, -1.0), (2.0, 2.0), (0.1, 0.0)]
    assert refs[3].dyn == 7


# Each pattern (prefix, unit repeated, suffix) made 100k and 400k characters long: the time must grow ~4× (≤ 6×,
# or stay under a floor that the old quadratic parsers far exceeded: '<a:' took 3.9 s at 300k, ':' 1.2 s at 400k
# in the emphasis parser, a 20k-digit non-number 25 s), and 400k characters must parse in < 2 s. CPU time of this
# process: other processes' load does not count.
PATTERNS = [("", unit, "") for unit in ["<a:", ":", ": ", "(", "[", "\\", " ", "BREAK ", "<lora:", "<lora:x>",
                                        "(a", "a)", "(a:1.1.1)", "withLora(a)", "<a:b", ":1"]] + [
    ("<lora:x:", "1", "x>"), ("<lora:x:te=", "1", "@x>"), ("<lora:x:lbw=", "1,", "x>"), ("<lora:x:1:1:", "0", ">"),
    ("withLora(x,", "1", "x)"), ("(a:", "1", "x)"), ("(a:", "1", ".1.1)"), ("a", " ", "BREAK")]
FLOOR_S, LIMIT_S = 0.5, 2.0


def _cpu_seconds(parse: Callable[[str], object], text: str) -> float:
    """CPU seconds of ``parse(text)``, garbage collection off: a full collection walks the whole test process's
    heap (torch, …) at moments that have nothing to do with the parser."""
    gc.disable()
    try:
        start = time.process_time()
        parse(text)
    except PromptSyntaxError:
        pass  # '<lora:' * k is not closed: an error, found in linear time too
    finally:
        seconds = time.process_time() - start
        gc.enable()
    return seconds


@pytest.mark.parametrize("parse", [parse_prompt, parse_emphasis], ids=["parse_prompt", "parse_emphasis"])
def test_parsers_take_linear_time(parse: Callable[[str], object]) -> None:
    for prefix, unit, suffix in PATTERNS:
        small = _cpu_seconds(parse, prefix + unit * (100_000 // len(unit)) + suffix)
        big = _cpu_seconds(parse, prefix + unit * (400_000 // len(unit)) + suffix)
        pattern = f"{prefix}{unit!r}…{suffix}"
        assert big < LIMIT_S, f"{pattern} × 400k characters: {big:.2f} s"
        assert big <= max(6 * small, FLOOR_S), f"{pattern}: 100k {small:.3f} s, 400k {big:.3f} s"


@pytest.mark.parametrize("text,expected", [
    ("(a:1.1.1)", [("a:1.1.1", 1.1)]),  # a malformed weight is text; the bracket still weights it
    ("(a:.)", [("a:.", 1.1)]),
    ("(a:1e3)", [("a:1e3", 1.1)]),  # A1111's weight syntax has no exponent
    ("(a:" + "9" * 400 + ")", [("a:" + "9" * 400, 1.1)]),  # would be inf: text
    ("(a:1.5.)", [("a:1.5.", 1.1)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:.5) (b: -1 )", [("a", 0.5), (" ", 1.0), ("b", -1.0)]),
    ("(a::1.2)", [("a:", 1.2)]),
    ("[(a:-1)]", [("a", -1 / 1.1)]),  # a weight of -1 is a weight, not a BREAK
    ("a" + " " * 50 + "BREAK" + " " * 50 + "b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
])
def test_emphasis_malformed_weights_are_text(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])
