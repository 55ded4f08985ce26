"""``load_lora(path) -> LoraModel``: a file read into one adapter per target module, with what it targets."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, TypeVar, Union

import torch

from .adapters import Adapter, kind_of
from .errors import InvalidLora, UnmatchedKeys, UnsupportedLora
from .files.io import StateDict, load_file
from .formats import to_canonical
from .keymap import arch as archmod
from .keymap import detection, families
from .layout import build_layers

T = TypeVar("T")


@dataclass
class LoraModel:
    """A loaded LoRA. ``layers`` maps canonical module paths (``unet.down_blocks.0.…to_q``) to adapters."""

    name: str
    path: str | None
    dialect: str
    arch: str
    layers: dict[str, Adapter]
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    variant: str | None = None  # the finer base where the file shows it: flux-1-dev, flux-1-schnell, …
    also_fits: tuple[str, ...] = ()  # archs its keys fit as well, no metadata saying which (detection.alternatives)

    @property
    def base(self) -> str:
        """What the LoRA was made for, as finely as known: ``flux-1-dev``, ``sdxl``, ``unknown``…"""
        return self.variant or self.arch

    @property
    def network_types(self) -> list[str]:
        return sorted({kind_of(a) for a in self.layers.values()})

    @property
    def ranks(self) -> list[int]:
        return sorted({r for a in self.layers.values() if (r := a.rank) is not None})

    @property
    def rank(self) -> int | None:
        """The most common rank (kohya's ``network_dim``); ``ranks`` lists them all."""
        return _most_common(a.rank for a in self.layers.values())

    @property
    def alphas(self) -> list[float]:
        return sorted({a for ad in self.layers.values() if (a := ad.alpha) is not None})

    @property
    def alpha(self) -> float | None:
        return _most_common(a.alpha for a in self.layers.values())

    def modules_per_component(self) -> dict[str, int]:
        return dict(Counter(p.split(".", 1)[0] for p in self.layers))

    def __repr__(self) -> str:
        return (f"LoraModel({self.name!r}, arch={self.arch}, dialect={self.dialect}, types={self.network_types}, "
                f"layers={len(self.layers)})")


def _most_common(values: Iterable[T | None]) -> T | None:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def load_lora(path: str | Path, *, strict: bool = False, name: str | None = None) -> LoraModel:
    """Read a LoRA file of any supported dialect and network type."""
    sd, metadata = load_file(path)
    return lora_from_state_dict(sd, metadata, name=name or Path(path).stem, path=str(path), strict=strict)


def lora_from_state_dict(sd: StateDict, metadata: dict[str, str], *, name: str = "lora", path: str | None = None,
                         strict: bool = False) -> LoraModel:
    """A ``LoraModel`` from tensors and metadata. Raises ``InvalidLora`` for a file whose layers contradict
    themselves or hold NaN/inf values (a LoRA carrying them only ever makes black images: refused, not applied)."""
    family = detection.detect(list(sd), metadata, sd)
    if isinstance(family, str):
        raise UnsupportedLora(path, f"this is a LoRA for {family}; lorakit applies LoRAs to {families.SUPPORTED}")
    try:
        canonical = to_canonical(sd, metadata, family)
    except InvalidLora as e:
        raise InvalidLora(path, e.problem) from None
    if canonical is None:
        sample = ", ".join(list(sd)[:3])
        raise UnsupportedLora(path, "no known LoRA key layout (kohya, LyCORIS, diffusers, PEFT, cloneofsimo, "
                                    f"ComfyUI, XLabs) matches; first keys: {sample}")
    layers, leftovers = build_layers(canonical.groups, family, path)
    leftovers = canonical.leftovers + leftovers
    if not layers:
        raise InvalidLora(path, f"no LoRA layers found ({len(leftovers)} keys not understood, e.g. "
                                f"{', '.join(leftovers[:3])})")
    if strict and leftovers:
        raise UnmatchedKeys(path, f"{len(leftovers)} keys not understood (strict mode): {', '.join(leftovers[:5])}")
    _refuse_non_finite(path, layers, canonical.embeddings)
    arch = family.arch or (family.sizes.of_layers(layers, metadata) if family.sizes is not None
                           else archmod.detect(canonical.groups, metadata))
    variant = detection.variant(family, list(sd), metadata, sd)
    return LoraModel(name, path, canonical.dialect, arch, layers, metadata, canonical.embeddings, leftovers, variant,
                     detection.alternatives(list(sd), metadata, sd))


def _refuse_non_finite(path: str | None, layers: dict[str, Adapter], embeddings: dict[str, torch.Tensor]) -> None:
    """``InvalidLora`` naming up to 5 layers (and embeddings) with NaN or inf values, and how many there are."""
    bad = [p for p, adapter in layers.items() if not all(all_finite(t) for t in adapter.leaves().values())]
    bad += [f"embedding {k}" for k, t in embeddings.items() if not all_finite(t)]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InvalidLora(path, f"NaN or inf values in {len(bad)} layers: {', '.join(bad[:5])}{more}; a LoRA "
                                "carrying them would only make black images, so it is not applied")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``: a float64 sum is finite exactly when every value is (NaN and ±inf propagate), at a third
    of the cost of ``isfinite().all()``; only a sum that overflows is checked value by value."""
    if not t.is_floating_point():
        return True
    return math.isfinite(t.sum(dtype=torch.float64)) or bool(torch.isfinite(t).all())


LoraLike = Union["LoraModel", str, os.PathLike[str]]
_LOADED: dict[tuple[str, int, int, bool], LoraModel] = {}
_CACHE_SIZE = 32


def load_cached(lora: LoraLike, *, strict: bool = False) -> LoraModel:
    """``lora`` itself, or the file loaded once per (path, mtime, size, strict) — the load cache shared by every
    request, so a LoRA used again is not read again while its file is unchanged."""
    if isinstance(lora, LoraModel):
        return lora
    p = Path(lora)
    st = p.stat() if p.exists() else None
    key = (str(p.resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0, strict)
    if key not in _LOADED:
        if len(_LOADED) >= _CACHE_SIZE:
            _LOADED.pop(next(iter(_LOADED)))  # the oldest entry
        _LOADED[key] = load_lora(p, strict=strict)
    return _LOADED[key]
