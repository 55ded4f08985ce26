"""PEFT / current diffusers: ``unet.…to_q.lora_A.weight`` (= down), ``lora_B`` (= up), optional ``.default.``,
``lora_magnitude_vector`` (DoRA, per output), older ``….lora.down.weight``; α and r from the safetensors header key
``lora_adapter_metadata`` (JSON: ``unet.lora_alpha``, ``unet.r``, ``unet.alpha_pattern``, ``unet.use_rslora``…).

The scale α/r (α/√r with rsLoRA) needs r before the adapters see the layer, so the down factors' shapes are
checked here, naming the file's key: a matrix (r, in[, kh, kw]) with r ≥ 1."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidLora
from ..files.header import loads_bounded
from ..keymap.families import SD, Family
from .base import Canonical, component_path, group, split_leaf

_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "lora_magnitude_vector")
_DOWN = re.compile(r"\.(?:lora_A|lora\.down|lora_down)(?:\.default)?\.weight$")
META_KEY = "lora_adapter_metadata"


def detect(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(m in k for k in sd for m in _MARKERS)


def _splitter(family: Family) -> Callable[[str], tuple[str, str] | None]:
    prefixes = sorted(family.peft.items(), key=lambda item: -len(item[0]))  # longest first

    def split(key: str) -> tuple[str, str] | None:
        parts = split_leaf(key)
        if parts is None:
            return None
        module, leaf = parts
        for prefix, component in prefixes:
            if module.startswith(prefix):
                return component_path(component, module[len(prefix):]), leaf
        return component_path(family.denoiser, module), leaf  # no prefix (DiffSynth, BFL control): the denoiser
    return split


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical:
    for key, t in sd.items():
        if _DOWN.search(key) and (t.dim() < 2 or t.shape[0] < 1):
            raise InvalidLora(None, f"key {key!r}: lora_A must be (r, in[, kh, kw]) with a rank r ≥ 1, got shape "
                                    f"{tuple(t.shape)}")
    split = _splitter(family)
    out = group(sd, split, "peft")
    magnitudes = {parts[0] for k in sd if "lora_magnitude_vector" in k and (parts := split(k)) is not None}
    for path in magnitudes & set(out.groups):
        # PEFT's magnitude is per output row, stored (out,) or, for convs, (1, out, 1, 1); a kohya ``dora_scale``
        # beside lora_A/lora_B keys (ComfyUI reads both) keeps its own shape, which tells its convention
        out.groups[path]["dora_scale"] = out.groups[path]["dora_scale"].reshape(-1, 1)
    _add_alphas(out, _adapter_metadata(metadata.get(META_KEY)))
    return out


def _adapter_metadata(raw: str | None) -> dict[str, Any]:
    """The decoded ``lora_adapter_metadata``: an object (``{}`` when absent)."""
    if not raw:
        return {}
    try:
        meta = loads_bounded(raw)
    except ValueError as e:
        raise InvalidLora(None, f"metadata {META_KEY!r} is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(meta, dict):
        raise InvalidLora(None, f"metadata {META_KEY!r} must be a JSON object, got {type(meta).__name__}")
    return meta


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidLora(None, f"metadata {META_KEY!r}: {name} must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def _add_alphas(out: Canonical, meta: dict[str, Any]) -> None:
    """Turn PEFT's per-component ``lora_alpha`` (+ ``alpha_pattern``, ``use_rslora``) into kohya ``scale`` keys."""
    if not meta:
        return
    for path, leaves in out.groups.items():
        component, _, module = path.partition(".")
        alpha = meta.get(f"{component}.lora_alpha")
        patterns = meta.get(f"{component}.alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise InvalidLora(None, f"metadata {META_KEY!r}: {component}.alpha_pattern must be an object")
        for pattern, value in patterns.items():
            if pattern_matches(pattern, module):
                alpha = value
        down = leaves.get("lora_down.weight")
        if alpha is None or down is None:
            continue
        r = down.shape[0]
        denom = math.sqrt(r) if meta.get(f"{component}.use_rslora") else r
        leaves["scale"] = torch.tensor(_number(f"{component}.lora_alpha", alpha) / denom)


def pattern_matches(pattern: str, module: str) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key names ``module``: the module or a dotted suffix of it, as
    PEFT matches (``(.*\\.)?key$``); a key written ``^path`` is that module only (PEFT's regex reads it so too)."""
    if pattern.startswith("^"):
        return module == pattern[1:]
    return module == pattern or module.endswith("." + pattern)
