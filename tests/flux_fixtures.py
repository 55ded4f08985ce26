"""FLUX.1 LoRA fixtures from key → shape listings of real files (``tests/fixtures/flux_listings/*.json``, written
by ``scripts/flux_listings.py`` from InvokeAI's listings): the state dict at full size as zero-stride tensors
(``zeros(()).expand(shape)``: a 12 B-parameter model's LoRA costs no memory), or at the tiny FLUX's sizes
(``tiny_shapes``: every width of FLUX.1, CLIP-L and T5-XXL mapped to the tiny models' of ``flux_factories``, blocks
past the tiny model's dropped) filled with seeded random values (``random_state_dict``).
``scripts/make_flux_fixtures.py`` writes either as a ``.safetensors`` file."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LISTINGS = Path(__file__).resolve().parent / "fixtures" / "flux_listings"
Shapes = dict[str, list[int]]

# Each listing's FLUX.1 base as its keys and shapes tell it (``LoraModel.base``); the two others are not FLUX.1
# files and ``lokr_bfl_invokeai``'s shapes are InvokeAI's synthetic ones (refused: kron(w1, w2) is no FLUX layer).
FLUX_BASES: dict[str, str] = {
    "kohya": "flux-1", "kohya_te1": "flux-1", "diffusers": "flux-1", "diffusers_no_proj_mlp": "flux-1",
    "diffusers_base_model": "flux-1", "diffusers_norm_out": "flux-1-dev", "aitoolkit": "flux-1",
    "onetrainer_dora": "flux-1", "xlabs": "flux-1", "control": "flux-1-dev-control", "lokr_bfl": "flux-1"}
NOT_APPLICABLE = ("lokr_bfl_invokeai", "qwen_kohya", "qwen_diffusers")


def load_listing(name: str) -> dict[str, Any]:
    """``{"source", "origin", "dialect", "note", "metadata", "shapes"}`` of ``<name>.json`` (or a path)."""
    path = Path(name) if name.endswith(".json") else LISTINGS / f"{name}.json"
    listing: dict[str, Any] = json.loads(path.read_text())
    return listing


def listing_names() -> list[str]:
    return sorted(p.stem for p in LISTINGS.glob("*.json"))


def zero_state_dict(shapes: Mapping[str, list[int]], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Full-size tensors that cost nothing: one zero each, expanded (stride 0) to the listed shape."""
    return {k: torch.zeros((), dtype=dtype).expand(s) for k, s in shapes.items()}


# -- the tiny sizes ------------------------------------------------------------------------------------------------
# Widths per component: FLUX.1 (h 3072 → 32: qkv 9216, mlp 12288, linear1 21504, linear2 15360, adaLN 6h/3h/2h;
# txt_in 4096 and vector_in 768 → 32, time/guidance 256 stay, img_in/proj_out 64 → 4 latent channels, control
# 128 → 8, Fill 384 → 24); CLIP-L (768 → 32, MLP 3072 → 37); T5-XXL (4096 → 32, d_ff 10240 → 37).
TRANSFORMER = {3072: 32, 12288: 128, 9216: 96, 21504: 224, 15360: 160, 6144: 64, 18432: 192, 4096: 32, 768: 32,
               256: 256, 64: 4, 128: 8, 384: 24}
CLIP = {768: 32, 3072: 37}
T5 = {4096: 32, 10240: 37}
HEAD_DIM = {128: 16}  # q/k RMSNorm scales (``…query_norm.scale``): one head's width
RANK_CAP = 8
DOWN = ("lora_down.weight", "lora_A.weight", "down.weight")
UP = ("lora_up.weight", "lora_B.weight", "up.weight")
LEAVES = sorted(DOWN + UP + ("lora_B.bias", "alpha", "dora_scale", "lokr_w1", "lokr_w2", "scale"),
                key=lambda s: -len(s))
_DOUBLE = re.compile(r"(?<!single_)(?:double_blocks|transformer_blocks)[._](\d+)[._]")
_SINGLE = re.compile(r"(?:single_blocks|single_transformer_blocks)[._](\d+)[._]")
_CLIP_LAYER = re.compile(r"(?:^|[._])layers[._](\d+)[._]")
_T5_BLOCK = re.compile(r"(?:^|[._])block[._](\d+)[._]")


@dataclass(frozen=True)
class Tiny:
    """Block counts of the tiny models (``flux_factories``: 2 double, 3 single; CLIP and T5 2 layers each)."""

    double: int = 2
    single: int = 3
    clip_layers: int = 2
    t5_layers: int = 2


def split_key(key: str) -> tuple[str, str]:
    """(module, leaf) of a listing key: the longest known leaf suffix."""
    leaf = next((leaf for leaf in LEAVES if key.endswith("." + leaf)), None)
    if leaf is None:
        raise ValueError(f"{key}: no known leaf")
    return key[: -len(leaf) - 1], leaf


def component(module: str) -> str:
    """``transformer``, ``clip`` or ``t5`` (in a FLUX file ``lora_te2_`` is T5: OneTrainer's name for it)."""
    if module.startswith(("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l")):
        return "clip"
    if module.startswith(("lora_te2_", "lora_te3_", "text_encoder_2.", "text_encoders.t5xxl")):
        return "t5"
    return "transformer"


def kept(module: str, tiny: Tiny) -> bool:
    """Whether the tiny models have the module's block (or layer)."""
    part = component(module)
    checks = {"transformer": ((_DOUBLE, tiny.double), (_SINGLE, tiny.single)),
              "clip": ((_CLIP_LAYER, tiny.clip_layers),), "t5": ((_T5_BLOCK, tiny.t5_layers),)}[part]
    return all(m is None or int(m[1]) < limit for pattern, limit in checks if (m := pattern.search(module)))


def tiny_shapes(shapes: Mapping[str, list[int]], tiny: Tiny = Tiny()) -> Shapes:
    """The listing at the tiny models' sizes: modules of blocks they lack dropped, widths mapped, ranks ≤ 8."""
    modules: dict[str, dict[str, list[int]]] = {}
    for key, dims in shapes.items():
        module, leaf = split_key(key)
        modules.setdefault(module, {})[leaf] = dims
    out: Shapes = {}
    for module, leaves in modules.items():
        if kept(module, tiny):
            widths = {"transformer": TRANSFORMER, "clip": CLIP, "t5": T5}[component(module)]
            out.update({f"{module}.{leaf}": d for leaf, d in _tiny_module(module, leaves, widths).items()})
    return out


def _width(widths: Mapping[int, int], d: int, module: str) -> int:
    if d not in widths:
        raise ValueError(f"{module}: no tiny width for {d} (known: {sorted(widths)})")
    return widths[d]


def _tiny_module(module: str, leaves: Mapping[str, list[int]], widths: Mapping[int, int]) -> Shapes:
    """One module's leaves at tiny size: LoRA down (r, in) / up (out, r) / bias (out,), DoRA (1, in) or (out, 1),
    LoKr w1 (a, b) ⊗ w2 (c, d) = (out, in), RMSNorm scale (head,), α ()."""
    out: Shapes = {}
    if "lokr_w1" in leaves:
        (a, b), (c, d) = leaves["lokr_w1"], leaves["lokr_w2"]
        o, i = _width(widths, a * c, module), _width(widths, b * d, module)
        w1 = [math.gcd(a, o), math.gcd(b, i)]
        out.update(lokr_w1=w1, lokr_w2=[o // w1[0], i // w1[1]])
    for leaf, dims in leaves.items():
        if leaf in DOWN:
            out[leaf] = [min(dims[0], RANK_CAP), _width(widths, dims[1], module)]
        elif leaf in UP:
            out[leaf] = [_width(widths, dims[0], module), min(dims[1], RANK_CAP)]
        elif leaf == "scale":
            out[leaf] = [_width(HEAD_DIM, dims[0], module)]
        elif leaf in ("lora_B.bias", "dora_scale"):
            out[leaf] = [d if d == 1 else _width(widths, d, module) for d in dims]
        elif leaf == "alpha":
            out[leaf] = dims
    return out


# -- values --------------------------------------------------------------------------------------------------------
def random_state_dict(shapes: Mapping[str, list[int]], seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded values of a plausible size for every listed tensor: ΔW about as large as the tiny model's weights
    (down ~ N(0, 1/in), up ~ N(0, 0.25/r)), α = r/2, biases small, DoRA magnitudes and norm scales near 1."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, dims in shapes.items():
        module, leaf = split_key(key)
        out[key] = _value(leaf, dims, shapes, module, gen).to(dtype)
    return out


def _value(leaf: str, dims: list[int], shapes: Mapping[str, list[int]], module: str,
           gen: torch.Generator) -> torch.Tensor:
    n = torch.randn(dims, generator=gen)
    if leaf in DOWN:
        return n / math.sqrt(dims[1])
    if leaf in UP:
        return n * 0.5 / math.sqrt(dims[1])
    if leaf == "alpha":
        down = next((shapes[f"{module}.{d}"] for d in DOWN if f"{module}.{d}" in shapes), None)
        return torch.tensor(down[0] / 2 if down else 1.0)
    if leaf == "lokr_w2":
        return n * 0.5 / math.sqrt(dims[1] * shapes[f"{module}.lokr_w1"][1])
    if leaf in ("dora_scale", "scale"):
        return 1.0 + 0.1 * n
    return n * 0.05 if leaf == "lora_B.bias" else n
