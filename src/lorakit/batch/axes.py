"""Grid axes: ``KIND[:LORA]=VALUES`` → the values to sweep and how each one changes a request.

Kinds: ``lora:NAME`` (the LoRA's weight: te and unet), ``te:NAME``, ``unet:NAME``, ``lbw:NAME`` (a
lora-block-weight preset such as ``OUTD``, or a quoted vector ``"1,0,0,…"``), ``prompt`` (A1111's Prompt S/R: the
first value is searched in the prompt and negative prompt and replaced by each value), ``seed``, ``steps``, ``cfg``,
``sampler``, ``clip_skip``. Values are comma-separated as in A1111 (CSV: quote a value that holds a comma); numbers
take A1111's ranges — ``1-9 (+2)`` is 1,3,5,7,9 (a step), ``0-1 [5]`` is 0,0.25,0.5,0.75,1 (a count, linspace;
whole-number axes truncate as A1111 does) — and a range may run downwards (``5-1``). A seed of ``-1`` becomes one
random seed. A LoRA axis rewrites the LoRA's tag (``<lora:NAME:…>``, in the prompt or the negative prompt); a LoRA
the prompt does not name gets a tag ``<lora:NAME:1>`` appended.
"""
from __future__ import annotations

import csv
import io
import math
import random
import re
from dataclasses import dataclass, replace
from typing import Any

from ..errors import GridError, LorakitError
from ..generate.pipeline import LIMITS, Request
from ..generate.samplers import sampler_name
from ..patch.weights import PRESETS, as_weight
from ..prompt import parse_prompt

KINDS = ("lora", "te", "unet", "lbw", "prompt", "seed", "steps", "cfg", "guidance", "sampler", "clip_skip")
ALIASES = {"weight": "lora", "sr": "prompt", "prompt_sr": "prompt", "cfg_scale": "cfg", "clip-skip": "clip_skip",
           "clipskip": "clip_skip", "block": "lbw", "blocks": "lbw", "distilled_cfg": "guidance",
           "distilled_cfg_scale": "guidance", "transformer": "unet"}
LORA_KINDS = ("lora", "te", "unet", "lbw")
INTS, FLOATS = ("seed", "steps", "clip_skip"), ("lora", "te", "unet", "cfg", "guidance")
MAX_VALUES = 1000  # per axis: more is a typo (1-100000) long before it is a grid
MAX_SEED = 2 ** 64 - 1 - LIMITS["batch"][1]
_INT, _FLOAT = r"[+-]?\d+", r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)


def _range(num: str) -> re.Pattern[str]:
    """``A-B``, ``A-B (+S)`` (step) or ``A-B [N]`` (count), spaces allowed as in A1111."""
    return re.compile(rf"\s*({num})\s*-\s*({num})\s*(?:\(\s*({num})\s*\)|\[\s*(\d+)\s*\])?\s*")


RANGES = {"int": _range(_INT), "float": _range(_FLOAT)}


@dataclass(frozen=True)
class Axis:
    """One swept setting: ``kind`` (one of ``KINDS``), the LoRA it acts on (LoRA kinds), the values in order."""

    kind: str
    target: str | None
    values: tuple[Any, ...]
    text: str  # as given, for the infotext

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind

    def label(self, value: Any) -> str:
        """The text drawn beside a row or column, as A1111 labels its axes."""
        shown = num(value) if isinstance(value, float) else str(value)
        titles = {"seed": "Seed", "steps": "Steps", "cfg": "CFG", "guidance": "Distilled CFG", "sampler": "Sampler",
                  "clip_skip": "Clip skip",
                  "lora": f"{self.target}", "te": f"{self.target} te", "unet": f"{self.target} unet",
                  "lbw": f"{self.target} lbw"}
        return shown if self.kind == "prompt" else f"{titles[self.kind]}: {shown}"

    def check(self, base: Request) -> None:
        """Raise ``GridError`` if the axis cannot act on ``base`` (Prompt S/R's first value must be there)."""
        first = self.values[0]
        if self.kind == "prompt" and first not in base.prompt and first not in base.negative:
            raise GridError(f"{self.text!r}: Prompt S/R did not find {first!r} (its first value) in the prompt or "
                            "the negative prompt")
        if self.kind in LORA_KINDS:
            for ref in parse_prompt(base.prompt).loras + parse_prompt(base.negative, negative=True).loras:
                if ref.name.casefold() == str(self.target).casefold() and ref.syntax == "invokeai":
                    raise GridError(f"{self.text!r}: the prompt names {ref.name} as withLora(…); write it as "
                                    f"<lora:{ref.name}:WEIGHT> so the axis can change it")

    def apply(self, req: Request, value: Any) -> Request:
        """``req`` with this axis at ``value``."""
        if self.kind == "prompt":
            first = self.values[0]
            return replace(req, prompt=req.prompt.replace(first, value), negative=req.negative.replace(first, value))
        if self.kind in LORA_KINDS:
            shown = num(value) if isinstance(value, float) else str(value)
            changes = {"te": shown, "unet": shown} if self.kind == "lora" else {self.kind: shown}
            return set_lora_args(req, str(self.target), changes)
        return replace(req, **{self.kind: value})


def parse_axis(text: str, option: str = "axis") -> Axis:
    """``"lora:style=0-1 [5]"`` → ``Axis``; ``option`` (``--x``) names the flag in error messages."""
    head, sep, values = text.partition("=")
    where = f"{option} {text!r}"
    if not sep or not head.strip():
        raise GridError(f"{where}: expected KIND=VALUES or KIND:LORA=VALUES, e.g. lora:style=0,0.5,1 or "
                        f"seed=1-4; kinds: {', '.join(KINDS)}")
    kind, _, target = (s.strip() for s in head.partition(":"))
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in KINDS:
        raise GridError(f"{where}: unknown axis {kind!r}; known: {', '.join(KINDS)}")
    if (kind in LORA_KINDS) != bool(target):
        raise GridError(f"{where}: " + (f"name the LoRA, e.g. {kind}:style=…" if kind in LORA_KINDS else
                                        f"{kind} takes no LoRA name (write {kind}=…)"))
    items = _items(values, where)
    parsed = tuple(_value(kind, item, where) for item in _expand(kind, items, where))
    if kind == "prompt" and len(parsed) < 2:
        raise GridError(f"{where}: Prompt S/R needs the text to find and at least one replacement")
    return Axis(kind, target or None, parsed, text)


def _items(values: str, where: str) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(values), skipinitialspace=True, strict=True))
    except csv.Error as e:
        raise GridError(f"{where}: the values are not valid comma-separated text ({e})") from None
    items = [item.strip() for row in rows for item in row]
    if not items or any(not item for item in items):
        raise GridError(f"{where}: an empty value; give values separated by commas")
    return items


def _expand(kind: str, items: list[str], where: str) -> list[str | int | float]:
    """Numbers and A1111 ranges → the list of values (other kinds: the items as they are)."""
    if kind not in INTS and kind not in FLOATS:
        return list(items)
    out: list[str | int | float] = []
    for item in items:
        m = RANGES["int" if kind in INTS else "float"].fullmatch(item)
        out += _range_values(m, kind in INTS, where) if m else [item]
        if len(out) > MAX_VALUES:
            raise GridError(f"{where}: more than {MAX_VALUES} values on one axis")
    return out


def _range_values(m: re.Match[str], whole: bool, where: str) -> list[int | float]:
    cast = int if whole else float
    start, end = cast(m[1].replace(" ", "")), cast(m[2].replace(" ", ""))
    if m[4] is not None:  # [count]: evenly spaced, both ends included
        count = int(m[4])
        if not 1 <= count <= MAX_VALUES:
            raise GridError(f"{where}: a range count must be from 1 to {MAX_VALUES}, got {count}")
        points = [start + (end - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]
        return [int(p) if whole else _tidy(p) for p in points]  # int(): truncation, as A1111
    step = cast(m[3]) if m[3] is not None else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise GridError(f"{where}: the step {num(step)} never gets from {num(start)} to {num(end)}")
    count = math.floor((end - start) / step + 1e-9) + 1  # inclusive of the end when a step lands on it
    if count > MAX_VALUES:
        raise GridError(f"{where}: the range has {count} values; at most {MAX_VALUES}")
    return [start + i * step if whole else _tidy(start + i * step) for i in range(count)]


def _value(kind: str, item: str | float, where: str) -> Any:
    try:
        if kind in INTS:
            return _checked_int(kind, item if isinstance(item, int) else int(str(item)), where)
        if kind in FLOATS:
            value = float(item)
            if not math.isfinite(value):
                raise ValueError
            if kind in ("cfg", "guidance") and not LIMITS[kind][0] <= value <= LIMITS[kind][1]:
                raise GridError(f"{where}: {'CFG' if kind == 'cfg' else 'distilled guidance'} must be from "
                                f"{LIMITS[kind][0]:g} to {LIMITS[kind][1]:g}")
            return value
    except ValueError:
        whole = "whole " if kind in INTS else ""
        raise GridError(f"{where}: {item!r} is not a {whole}number or a range (A-B, A-B (+STEP), A-B [COUNT])"
                        ) from None
    if kind == "sampler":
        return _wrapped(where, lambda: sampler_name(str(item)))
    if kind == "lbw":
        return _lbw(str(item), where)
    return item


def _checked_int(kind: str, value: int, where: str) -> int:
    if kind == "seed":
        if value == -1:
            return random.randrange(2 ** 32 - 2)  # fixed once for every cell, as A1111 fixes -1 seeds
        if not 0 <= value <= MAX_SEED:
            raise GridError(f"{where}: a seed must be from 0 to {MAX_SEED} or -1 (random), got {value}")
    low, high = LIMITS["steps"] if kind == "steps" else (1, 10_000)
    if kind != "seed" and not low <= value <= high:
        raise GridError(f"{where}: {kind} must be from {low} to {high}, got {value}")
    return value


def _lbw(item: str, where: str) -> str:
    """A preset name (upper-cased) or a vector with its spaces removed, checked as the patcher will read it."""
    value = item.upper() if item.upper() in PRESETS else item.replace(" ", "")
    if value not in PRESETS and "," not in value:
        raise GridError(f"{where}: {item!r} is not an lbw preset ({', '.join(PRESETS)}); a vector must be quoted, "
                        'e.g. "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"')
    _wrapped(where, lambda: as_weight({"lbw": value}))
    return value


def _wrapped(where: str, fn: Any) -> Any:
    try:
        return fn()
    except LorakitError as e:
        raise GridError(f"{where}: {e}") from None


def set_lora_args(req: Request, name: str, changes: dict[str, str]) -> Request:
    """``req`` with ``changes`` (``te``/``unet``/``lbw``… as text) made to every tag of LoRA ``name`` in the prompt
    and negative prompt; without a tag, ``<lora:NAME:1>`` with the changes is appended to the prompt."""
    prompt, hits = _rewrite(req.prompt, name, changes)
    negative, neg_hits = _rewrite(req.negative, name, changes)
    if not hits + neg_hits:
        args = {"te": "1", "unet": "1", **changes}
        prompt = f"{prompt} <lora:{name}{_format(args)}>".strip()
    return replace(req, prompt=prompt, negative=negative)


def _rewrite(text: str, name: str, changes: dict[str, str]) -> tuple[str, int]:
    hits = 0

    def one(m: re.Match[str]) -> str:
        nonlocal hits
        parts = m[2].split(":")
        if parts[0].strip().casefold() != name.casefold():
            return m[0]
        hits += 1
        return f"<{m[1]}:{parts[0]}{_format({**_args(parts[1:]), **changes})}>"

    return TAG.sub(one, text), hits


def _args(parts: list[str]) -> dict[str, str]:
    """A tag's arguments by name, as the prompt parser reads them: positional te, unet (= te if absent), dyn;
    a named argument wins over a positional one."""
    positional = [p.strip() for p in parts if "=" not in p]
    args = {"te": "1", "unet": "1"}
    if positional:
        args["te"] = args["unet"] = positional[0]
        if len(positional) > 1:
            args["unet"] = positional[1]
        if len(positional) > 2:
            args["dyn"] = positional[2]
    for part in parts:
        if "=" in part:
            key, _, value = part.partition("=")
            args[key.strip()] = value.strip()
    return args


def _format(args: dict[str, str]) -> str:
    """``:TE`` or ``:TE:UNET`` (or named when a weight is a schedule), then the other arguments by name."""
    rest = dict(args)
    te, unet = rest.pop("te"), rest.pop("unet")
    if any(c in te + unet for c in "@~"):
        head = f":te={te}:unet={unet}"
    else:
        head = f":{te}" if te == unet else f":{te}:{unet}"
    return head + "".join(f":{k}={v}" for k, v in rest.items())


def num(value: float) -> str:
    """``0.25``, ``1`` (no ``1.0``), rounded to 8 places as A1111 labels."""
    r = round(float(value), 8)
    return str(int(r)) if r.is_integer() else repr(r)


def _tidy(value: float) -> float:
    return round(value, 10) + 0.0  # 0.30000000000000004 → 0.3; -0.0 → 0.0
