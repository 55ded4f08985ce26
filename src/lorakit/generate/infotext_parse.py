"""Reading A1111 infotexts back: ``parse_infotext`` gives what A1111's ``parse_generation_parameters`` gives (the
``parameters`` of ``/sdapi/v1/png-info``), ``lora_hashes`` the LoRAs named in its ``Lora hashes`` field.

The text is ``prompt lines``, optionally ``Negative prompt: …`` lines, then one line of ``Key: value`` pairs (taken
as such only when it holds at least three pairs; otherwise it belongs to the prompt). Values stay strings, as in
A1111 (``"Steps": "20"``); a ``"quoted"`` value is JSON-unquoted and kept whole (commas included); ``WxH`` splits
into ``Key-1`` / ``Key-2``. Then A1111's defaults fill what is missing (``"Clip skip": "1"``, the hires-fix and
inpainting fields, ``RNG``, …; a few of them numbers, as A1111 makes them), and an old ``First pass size`` is
turned into today's size and hires size. A1111's style extraction and version switches depend on its settings
and are not done. Each prompt line is stripped of surrounding spaces, as in A1111.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param
SPACES = re.compile(r"\s*")
WORD = re.compile(r"\w")
KEY_RUN = re.compile(r"[\w \-/]*")  # the characters of a key: a key can only end where such a run ends
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE = "Negative prompt:"
MIN_PARAMS = 3  # a last line with fewer "Key: value" pairs is part of the prompt

# What A1111 fills in when an infotext lacks a field (its numbers are numbers, its other values strings).
DEFAULTS: dict[str, Any] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
    "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
    "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0,
    "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
}


def parse_infotext(text: str) -> dict[str, Any]:
    """The fields of an A1111 infotext: ``Prompt``, ``Negative prompt``, then every ``Key: value`` of its last
    line (``Size`` as ``Size-1``, ``Size-2``), then A1111's defaults for what is missing."""
    *lines, last = text.strip().split("\n")
    pairs = param_pairs(last)
    if len(pairs) < MIN_PARAMS:
        lines.append(last)
        pairs = []
    prompt, negative = _prompts(lines)
    res: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    res.update(_params(pairs))
    _apply_defaults(res)
    return res


def _prompts(lines: list[str]) -> tuple[str, str]:
    """(prompt, negative prompt): the lines before the first that starts with ``Negative prompt:``, and from it
    (A1111 drops that label from every line that starts with it, and joins lines with newlines after the first
    non-empty one)."""
    prompt, negative, done = "", "", False
    for line in (raw.strip() for raw in lines):
        if line.startswith(NEGATIVE):
            done = True
            line = line[len(NEGATIVE):].strip()
        if done:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    return prompt, negative


def param_pairs(line: str) -> list[tuple[str, str]]:
    """``PARAM.findall(line)`` in linear time. Where no pair starts, ``findall`` tries again one character on,
    which takes quadratic time on a long run of words or spaces without a colon (a 20,000-character line: seconds;
    a PNG text chunk may hold 1 MB). No pair can start inside such a run either, so it is skipped whole."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(line):
        found = PARAM.match(line, pos)
        if found:
            pairs.append((found.group(1), found.group(2)))
            pos = found.end()
            continue
        pos = _end(SPACES, line, pos)  # a failed pair from here fails from each of these spaces too
        pos = _end(KEY_RUN, line, pos) if WORD.match(line, pos) else pos + 1
    return pairs


def _end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    found = pattern.match(text, pos)
    return found.end() if found else pos


def _params(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not value:
            continue  # A1111 skips an empty value (its parser fails on it)
        value = _unquote(value)
        size = IMAGE_SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


def _unquote(value: str) -> str:
    """A ``"JSON string"`` as its text; anything else (or a quoted value JSON cannot read) as it is."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        text = json.loads(value)
    except ValueError:
        return value
    return text if isinstance(text, str) else value


def _apply_defaults(res: dict[str, Any]) -> None:
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    for key, value in DEFAULTS.items():
        res.setdefault(key, value)
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)
    _old_hires_fix(res)


def _old_hires_fix(res: dict[str, Any]) -> None:
    """Infotexts of late 2022 give the first pass as ``First pass size`` and the final size as ``Size``; today
    ``Size`` is the first pass and ``Hires resize`` the final size. ``0x0``: the first pass had ~512×512 pixels."""
    first_w, first_h = _whole(res.get("First pass size-1")), _whole(res.get("First pass size-2"))
    if first_w is None or first_h is None:
        return
    width, height = _whole(res.get("Size-1", 512)) or 512, _whole(res.get("Size-2", 512)) or 512
    if first_w == 0 or first_h == 0:
        scale = math.sqrt(512 * 512 / (width * height))
        first_w, first_h = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


def _whole(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def lora_hashes(params: Mapping[str, Any]) -> dict[str, str]:
    """The ``Lora hashes`` field of parsed parameters, ``"name: hash, name: hash"``, as name → hash. An entry
    without a colon is skipped; the name is what precedes the last colon (hashes have none)."""
    value = params.get("Lora hashes")
    if not isinstance(value, str):
        return {}
    out: dict[str, str] = {}
    for entry in value.split(","):
        name, colon, digest = entry.rpartition(":")
        if colon and name.strip() and digest.strip():
            out[name.strip()] = digest.strip()
    return out
