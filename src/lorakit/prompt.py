"""The LoRA tags of a prompt: a pure parser, text in → (text without tags, LoRA references) out.

Grammar (see docs/prompt-syntax.md)::

    tag       := "<" ("lora" | "lyco") ":" name (":" arg)* ">"
    arg       := number                      positional: te, unet, dyn (A1111 order)
               | key "=" value               te, unet (= transformer, dit), dyn, in, mid, out, double, single,
                                             lbw, start, stop
    value     := number | schedule | lbw     schedule := number "@" number (("," | ";") number "@" number)*
    invokeai  := "withLora(" name ["," number] ")"

Other ``<word:…>`` tags are left in the text with a warning. A number is a finite ASCII decimal (``0.8``, ``-1``,
``.5``, ``1e-1``); ``dyn`` a positive whole number. Linear time: each character is scanned O(1) times.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import pairwise

from .errors import PromptSyntaxError

__all__ = ["LoraRef", "ParsedPrompt", "PromptSyntaxError", "Schedule", "lone_surrogate", "parse_prompt"]

# One pattern for both tag forms: searching for each separately re-scanned the rest of the text at every tag.
SCAN = re.compile(r"<(?P<kind>[A-Za-z_][\w-]*):|(?P<invoke>withLora\()")
NAMED = ("te", "unet", "transformer", "dit", "dyn", "in", "mid", "out", "double", "single", "lbw", "start", "stop")
BLOCK_PARTS = ("in", "mid", "out", "double", "single")
DENOISER = ("transformer", "dit")  # other names of ``unet``: the denoiser of any family
# Unambiguous (no two ways to split a run of digits), so a long non-number fails in linear time.
NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
DYN_DIGITS = 9  # ranks are far below 10⁹; more digits would also meet int()'s 4,300-digit limit
MAX_WARNINGS = 10
SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates: text no encoder takes (server.guards uses it too)


@dataclass(frozen=True)
class Schedule:
    """A strength that changes during sampling: ``value@position`` points, linear between them, constant outside.
    When every position is ≤ 1 they are fractions of the steps, else step numbers (steps count from 1) — decided
    per schedule, as SD.Next does, so ``0.1@1,0.6@6`` means step 1 and step 6."""

    points: tuple[tuple[float, float], ...]  # (position, value)

    def at(self, step: int, total: int) -> float:
        fractions = max(p for p, _ in self.points) <= 1
        pts = sorted((p * total if fractions else p, v) for p, v in self.points)
        if step <= pts[0][0]:
            return pts[0][1]
        for (p0, v0), (p1, v1) in pairwise(pts):
            if step <= p1:
                return v0 + (v1 - v0) * (step - p0) / (p1 - p0) if p1 > p0 else v1
        return pts[-1][1]


Value = float | Schedule


@dataclass(frozen=True)
class LoraRef:
    """One LoRA named in a prompt, with its weights as written."""

    name: str
    te: Value = 1.0
    unet: Value = 1.0
    dyn: int | None = None
    blocks: tuple[tuple[str, float], ...] = ()  # ("in", 0.0), ("mid", 1.0), ("out", 0.5); ("double", 0.5)
    lbw: str | None = None  # a preset name or comma-separated values
    start: float | None = None  # like schedule positions: ≤ 1 fraction, > 1 step
    stop: float | None = None
    negative: bool = False
    column: int = 1
    syntax: str = "a1111"  # "a1111", "lyco", "invokeai"

    @property
    def scheduled(self) -> bool:
        """Whether the strength changes during sampling."""
        return any(isinstance(v, Schedule) for v in (self.te, self.unet)) or self.start is not None or \
            self.stop is not None

    def spec(self, step: int | None = None, total: int | None = None) -> dict[str, object]:
        """The weight mapping for ``apply_loras`` (see ``as_weight``) at ``step`` of ``total`` (1-based); without
        a step, schedules give their first value and ``start``/``stop`` are ignored."""
        on = step is None or total is None or _active(step, total, self.start, self.stop)
        out: dict[str, object] = {"te": _eval(self.te, step, total) if on else 0.0,
                                  "unet": _eval(self.unet, step, total) if on else 0.0}
        out.update(dict(self.blocks))
        if self.lbw is not None:
            out["lbw"] = self.lbw
        if self.dyn is not None:
            out["dyn"] = self.dyn
        return out


def _eval(value: Value, step: int | None, total: int | None) -> float:
    if isinstance(value, Schedule):
        return value.at(step, total) if step is not None and total is not None else \
            min(value.points)[1]
    return value


def _active(step: int, total: int, start: float | None, stop: float | None) -> bool:
    def pos(p: float) -> float:
        return p * total if p <= 1 else p  # a lone start/stop: ≤ 1 is a fraction
    return (start is None or step >= pos(start)) and (stop is None or step <= pos(stop))


@dataclass
class ParsedPrompt:
    text: str
    loras: list[LoraRef] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def lone_surrogate(text: str) -> int | None:
    """The 1-based column of the first lone surrogate in ``text`` (``None``: there is none)."""
    m = SURROGATE.search(text)
    return None if m is None else m.start() + 1


def parse_prompt(text: str, *, negative: bool = False) -> ParsedPrompt:
    """Find every LoRA tag in ``text``; return the text without them, the references, and warnings. A lone
    surrogate (undecodable bytes on a command line) is a ``PromptSyntaxError``: no tokenizer can encode it."""
    column = lone_surrogate(text)
    if column is not None:
        raise PromptSyntaxError(text, column, "not valid Unicode text (a lone surrogate: bytes that are not UTF-8?)")
    out = ParsedPrompt(text)
    pieces: list[str] = []
    others: list[str] = []
    i = 0
    while (m := SCAN.search(text, i)) is not None:
        pieces.append(text[i:m.start()])
        if m.group("invoke"):
            ref, i = _invokeai(text, m.start(), negative)
        elif m.group("kind").lower() in ("lora", "lyco"):
            ref, i = _tag(text, m, negative)
        else:
            pieces.append(m.group())
            others.append(f"column {m.start() + 1}: <{m.group('kind')}:…> is not a LoRA tag; left in the prompt")
            i = m.end()
            continue
        out.loras.append(ref)
    pieces.append(text[i:])
    out.text = re.sub(r"[ \t]{2,}", " ", "".join(pieces)).strip()
    out.warnings = others[:MAX_WARNINGS]
    if len(others) > MAX_WARNINGS:
        out.warnings.append(f"… and {len(others) - MAX_WARNINGS} more tags that are not LoRA tags")
    return out


def _close(text: str, start: int, closer: str, what: str) -> int:
    end = text.find(closer, start)
    if end < 0:
        raise PromptSyntaxError(text, start + 1, f"{what} is not closed with '{closer}'")
    return end


def _tag(text: str, m: re.Match[str], negative: bool) -> tuple[LoraRef, int]:
    end = _close(text, m.start(), ">", f"<{m.group('kind')}:")
    body, col = text[m.end():end], m.end() + 1
    parts = body.split(":")
    name = parts[0].strip()
    if not name:
        raise PromptSyntaxError(text, col, "the LoRA name is empty")
    fields: dict[str, object] = {}
    blocks: list[tuple[str, float]] = []
    positional: list[tuple[str, int]] = []
    offset = col + len(parts[0]) + 1
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            key = _key(text, key.strip(), offset)
            parsed = _named_value(text, key, value.strip(), offset)
            key = "unet" if key in DENOISER else key
            if key in BLOCK_PARTS:
                blocks.append((key, parsed))  # type: ignore[arg-type]
            else:
                fields[key] = parsed
        else:
            positional.append((part.strip(), offset))
        offset += len(part) + 1
    _positional(text, positional, fields)
    fields["blocks"] = tuple(blocks)
    syntax = "lyco" if m.group("kind").lower() == "lyco" else "a1111"
    return LoraRef(name=name, negative=negative, column=m.start() + 1, syntax=syntax, **fields), end + 1  # type: ignore[arg-type]


def _key(text: str, key: str, col: int) -> str:
    if key not in NAMED:
        raise PromptSyntaxError(text, col, f"unknown LoRA argument {_short(key)}; known: {', '.join(NAMED)}")
    return key


def _positional(text: str, args: list[tuple[str, int]], fields: dict[str, object]) -> None:
    """A1111: ``<lora:name:te:unet:dyn>``; one number sets both te and unet."""
    if len(args) > 3:
        raise PromptSyntaxError(text, args[3][1], "at most three positional values (te, unet, dyn)")
    if args:
        w = _number(text, *args[0])
        fields.setdefault("te", w)
        fields.setdefault("unet", _number(text, *args[1]) if len(args) > 1 else w)
    if len(args) > 2:
        fields.setdefault("dyn", _int(text, *args[2]))


def _named_value(text: str, key: str, value: str, col: int) -> object:
    at = col + len(key) + 1
    if key in ("te", "unet", *DENOISER):
        return _schedule(text, value, at) if "@" in value or "~" in value else _number(text, value, at)
    if key == "dyn":
        return _int(text, value, at)
    if key == "lbw":
        return _lbw(text, value, at)
    return _number(text, value, at)


def _number(text: str, value: str, col: int) -> float:
    if not NUMBER.fullmatch(value):
        raise PromptSyntaxError(text, col, f"expected a number, got {_short(value)}")
    number = float(value)
    if not math.isfinite(number):  # 1e400
        raise PromptSyntaxError(text, col, f"expected a finite number, got {_short(value)}")
    return number


def _int(text: str, value: str, col: int) -> int:
    # str.isdigit() accepts "²" and "①", which int() rejects: only ASCII digits are a number here.
    digits = value.lstrip("0")
    if not (value.isascii() and value.isdigit()) or not digits or len(digits) > DYN_DIGITS:
        raise PromptSyntaxError(text, col, f"dyn must be a positive whole number, got {_short(value)}")
    return int(digits)


def _short(value: str, limit: int = 40) -> str:
    """``repr`` of ``value``, cut to ``limit`` characters (a message never repeats a whole huge prompt)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"… ({len(value)} characters)"


def _schedule(text: str, value: str, col: int) -> Schedule:
    points = []
    for item in re.split("[,;]", value):
        v, sep, p = item.replace("~", "@").partition("@")
        if not sep:
            raise PromptSyntaxError(text, col, f"a schedule is value@position pairs, got {_short(item)}")
        points.append((_number(text, p.strip(), col), _number(text, v.strip(), col)))
        col += len(item) + 1
    return Schedule(tuple(points))


def _lbw(text: str, value: str, col: int) -> str:
    if re.fullmatch(r"[A-Za-z]+", value):
        return value.upper()
    for item in value.split(","):
        _number(text, item.strip(), col)
    return value


def _invokeai(text: str, start: int, negative: bool) -> tuple[LoraRef, int]:
    end = _close(text, start, ")", "withLora(")
    body = text[start + len("withLora("):end]
    name, _, weight = body.partition(",")
    if not name.strip():
        raise PromptSyntaxError(text, start + 10, "the LoRA name is empty")
    w = _number(text, weight.strip(), start + 10 + len(name) + 1) if weight.strip() else 1.0
    return LoraRef(name=name.strip(), te=w, unet=w, negative=negative, column=start + 1, syntax="invokeai"), end + 1
