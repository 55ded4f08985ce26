"""Weight specs: a float, or per part (``unet`` — also spelt ``transformer`` or ``dit``: the denoiser of any
family —, ``te``), per block (``in``/``mid``/``out`` as SD.Next for UNets, ``double``/``single`` for FLUX.1's
transformer, or a lora-block-weight vector / preset as ``lbw``), and DyLoRA ``dyn``.

lbw vectors are told apart by length, each family listing those its models take (``Family.lbw``: SD1/SD2 17
(LoRA) or 26 (LoCon), SDXL 12 or 20, FLUX.1 and Chroma 58 — ``BASE``, 19 double blocks, 38 single blocks: the
layout of ComfyUI's and Forge's block-weight tools); ``BASE`` is the text encoder(s). Blocks a vector does not list
keep the part weight (×1). Denoiser layers outside every block (time and label embeddings; FLUX's embedders and final
layer) follow ``BASE`` under an lbw vector or preset (so ``NONE`` changes nothing and ``ALL`` everything);
``in``/``mid``/``out`` and ``double``/``single`` leave them at the ``unet`` weight. Block names of one family on a
model of another are an error, not ignored; so is a vector on a model whose family takes none.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ..errors import WeightSpecError
from ..keymap import block_id
from ..keymap.arch import NAMES
from ..keymap.blocks import DIT_GROUPS, BlockVector
from ..keymap.families import FAMILIES, all_block_vectors, block_vectors, family_of_arch, unet_last_out, vector_takers

_IN = [f"IN{i:02d}" for i in range(12)]
_OUT = [f"OUT{i:02d}" for i in range(12)]
VECTORS: dict[int, BlockVector] = all_block_vectors()  # every family's lbw vectors, by length
UNET_PARTS = {"in": _IN, "mid": ["M00"], "out": _OUT}
DIT_PARTS = {"double": ["DOUBLE"], "single": ["SINGLE"]}
DENOISER_ALIASES = ("transformer", "dit")  # other names of the ``unet`` part
PRESETS: dict[str, set[str]] = {
    "NONE": set(), "ALL": {"BASE", *_IN, "M00", *_OUT},
    "INS": {"BASE", "IN01", "IN02", "IN04"}, "IND": {"BASE", "IN05", "IN07", "IN08"},
    "INALL": {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"},
    "MIDD": {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05"},
    "OUTD": {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"},
    "OUTS": {"BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"},
    "OUTALL": {"BASE", *_OUT[3:12]},
}


@dataclass(frozen=True)
class Weight:
    """A LoRA's strength. ``blocks`` maps block ids (``BASE``, ``IN04``, ``M00``, ``OUT03``…) to factors."""

    unet: float = 1.0
    te: float = 1.0
    blocks: Mapping[str, float] = field(default_factory=dict)
    dyn: int | None = None
    vector: BlockVector | None = None  # the lbw vector's layout when one gave the blocks

    def for_path(self, canonical_path: str, arch: str) -> float:
        """The multiplier of one layer: part weight × block factor."""
        if self.blocks:
            self._check_family(arch)
        is_te = canonical_path.startswith("text_encoder")
        base = self.te if is_te else self.unet
        block = block_id(canonical_path, last_out=unet_last_out(arch))
        if block is not None and block not in self.blocks and block[0] in DIT_GROUPS:
            return base * self.blocks.get(DIT_GROUPS[block[0]], 1.0)  # double=/single= name every such block
        return base * self.blocks.get(block or "BASE", 1.0)

    def _check_family(self, arch: str) -> None:
        """Block weights name one family's blocks: on another family's model they are an error. An lbw vector fits
        the models whose family lists it (``Family.lbw``); ``double``/``single`` the transformers with those blocks
        (``Family.dit_blocks``)."""
        parts = family_of_arch(arch).dit_blocks
        fitting = block_vectors(arch)
        if self.vector is not None and self.vector not in fitting:
            raise WeightSpecError(f"a {len(self.blocks)}-value block-weight vector is for "
                                  f"{vector_takers(self.vector)}, the model is {arch}")
        unet_blocks = any(b.startswith(("IN", "M0", "OUT")) for b in self.blocks)
        dit_blocks = {b for b in self.blocks if b in ("DOUBLE", "SINGLE") or b[0] in DIT_GROUPS and b[1:].isdigit()}
        if parts and unet_blocks and self.vector is None:
            vectors = "".join(f" or a {len(v.blocks)}-value lbw vector ({v.layout})" for v in fitting)
            raise WeightSpecError(f"in/mid/out name a UNet's blocks; {NAMES.get(arch, arch)} has "
                                  f"{' and '.join(parts)} blocks: use {'=…/'.join(parts)}=…{vectors}")
        missing = {b for b in dit_blocks if DIT_GROUPS.get(b[0], b).lower() not in parts}
        if missing:
            raise WeightSpecError(f"{_dit_parts_message()}; the model is {arch}: use in/mid/out or an lbw vector")

    def describe(self, parts: Collection[str] = ("te", "unet")) -> str:
        """``te 0.8, unet 1`` (+ every block factor that is not 1, dyn) for log lines; ``parts``: the parts the
        LoRA has (a UNet-only LoRA is described without a text-encoder weight)."""
        text = ", ".join(f"{part} {getattr(self, part):g}" for part in ("te", "unet") if part in parts)
        if self.blocks:
            off = sorted(b for b, v in self.blocks.items() if v != 1.0)
            text += f", blocks ≠1: {', '.join(f'{b} {self.blocks[b]:g}' for b in off)}" if off else ""
        return text + (f", dyn {self.dyn}" if self.dyn else "")


def as_weight(spec: float | int | Mapping[str, object] | Weight) -> Weight:
    """Accept ``0.8``, ``Weight(...)`` or a mapping: ``{"unet": 1, "te": 0.5, "in": 0, "mid": 1, "out": 0,
    "lbw": "OUTD" | [1, 0, …] | "1,0,…", "dyn": 4, "weight": 0.8}`` (``weight`` multiplies both parts)."""
    if isinstance(spec, Weight):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (int, float, Mapping)):
        raise WeightSpecError(f"a LoRA weight must be a number or a mapping, got {spec!r}")
    if not isinstance(spec, Mapping):
        return Weight(unet=_num(spec, "weight"), te=_num(spec, "weight"))
    unknown = set(spec) - {"unet", "te", "lbw", "dyn", "weight", *UNET_PARTS, *DIT_PARTS, *DENOISER_ALIASES}
    if unknown:
        raise WeightSpecError(f"unknown weight part(s) {sorted(unknown)}; known: unet (or transformer, dit), te, in, "
                              "mid, out, double, single, lbw, dyn, weight")
    named = [k for k in ("unet", *DENOISER_ALIASES) if k in spec]
    if len(named) > 1:
        raise WeightSpecError(f"{' and '.join(named)} name the same part (the denoiser): give one")
    w = _num(spec.get("weight", 1.0), "weight")
    unet = w * _num(spec.get(named[0] if named else "unet", 1.0), named[0] if named else "unet")
    te = w * _num(spec.get("te", 1.0), "te")
    blocks, family = _blocks(spec)
    dyn = spec.get("dyn")
    if dyn is not None and (not isinstance(dyn, int) or isinstance(dyn, bool) or dyn < 1):
        raise WeightSpecError(f"dyn must be a positive whole number, got {dyn!r}")
    return Weight(unet, te, blocks, dyn, family)


def _num(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise WeightSpecError(f"weight part {name!r} must be a finite number, got {v!r}")
    return float(v)


def _blocks(spec: Mapping[str, object]) -> tuple[dict[str, float], BlockVector | None]:
    blocks: dict[str, float] = {}
    if "lbw" in spec:
        return _lbw(spec["lbw"])
    for part, names in {**UNET_PARTS, **DIT_PARTS}.items():
        if part in spec:
            blocks.update({n: _num(spec[part], part) for n in names})
    return blocks, None


def _lbw(value: object) -> tuple[dict[str, float], BlockVector | None]:
    if isinstance(value, str) and value.strip().upper() in PRESETS:
        members = PRESETS[value.strip().upper()]
        return {b: (1.0 if b in members else 0.0) for b in PRESETS["ALL"]}, None
    if isinstance(value, str):
        try:
            value = [float(x) for x in value.split(",")]
        except ValueError:
            raise WeightSpecError(f"lbw must be a preset ({', '.join(PRESETS)}) or comma-separated numbers, got "
                                  f"{value!r}") from None
    if not isinstance(value, (list, tuple)) or len(value) not in VECTORS:
        n = len(value) if isinstance(value, (list, tuple)) else "?"
        raise WeightSpecError(f"an lbw vector has {_lengths_message()}, got {n}")
    vector = VECTORS[len(value)]
    return {n: _num(v, "lbw") for n, v in zip(vector.blocks, value)}, vector


def _lengths_message() -> str:
    """``17 or 26 values (SD1/SD2), 12 or 20 (SDXL) or 58 (FLUX.1 and Chroma)``: the vectors by whom they are for."""
    by_label: dict[str, list[str]] = {}
    for n, v in VECTORS.items():
        by_label.setdefault(vector_takers(v), []).append(str(n))
    parts = [f"{' or '.join(ns)}{' values' if i == 0 else ''} ({label})"
             for i, (label, ns) in enumerate(by_label.items())]
    return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]


def _dit_parts_message() -> str:
    """``double/single name FLUX.1's and Chroma's transformer blocks (Qwen-Image has double ones only)``, from the
    families' ``dit_blocks``."""
    every = [f.display for f in FAMILIES.values() if set(f.dit_blocks) == set(DIT_PARTS)]
    some = "".join(f" ({f.display} has {' and '.join(f.dit_blocks)} ones only)" for f in FAMILIES.values()
                   if f.dit_blocks and set(f.dit_blocks) != set(DIT_PARTS))
    return f"double/single name {' and '.join(n + chr(39) + 's' for n in every)} transformer blocks{some}"
