"""Which family a LoRA file is for, from its keys, a few layers' widths and its metadata (``detect``), and the finer
base of a FLUX.1 file (``variant``). The families themselves, and what lorakit knows of each: ``families``."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import flux, qwen, sd3
from .arch import Arch
from .families import CHROMA, FAMILIES, FLUX1, QWEN_IMAGE, SD, SD3, Family, Shaped

# Families lorakit does not apply (yet), by raw key names; tried after FLUX.1's own markers fail.
UNSUPPORTED: list[tuple[str, re.Pattern[str]]] = [
    ("HiDream", re.compile(r"double_stream_blocks")),
    ("AuraFlow", re.compile(r"joint_transformer_blocks")),
    ("Lumina 2", re.compile(r"noise_refiner|context_refiner|(?:^|[._])layers[._]\d+[._]attention[._]qkv")),
    ("Wan", re.compile(r"(?:^|[._])blocks[._]\d+[._](?:self_attn|cross_attn|ffn)[._]")),
    ("a transformer (DiT) model such as SD3, PixArt or Hunyuan", re.compile(r"^(lora_)?transformer[._]")),
]
_META: dict[str, str] = {"flux-2": "FLUX.2", "flux.2": "FLUX.2", "flux2": "FLUX.2", "chroma": "chroma",
                         "sd3": "sd3", "stable-diffusion-3": "sd3", "stable-diffusion-v3": "sd3", "qwen": "qwen-image",
                         "pixart": "PixArt",
                         "hunyuan": "Hunyuan", "auraflow": "AuraFlow", "cascade": "Stable Cascade",
                         "flux": "flux1"}
# A DiT's top-level ``transformer_blocks`` (FLUX.1's double blocks, SD3's joint blocks) under any dialect's prefix;
# an SD UNet's ``transformer_blocks`` sit inside ``attentions``, never at the top.
_DIFFUSERS_DOUBLE = re.compile(r"^(?:transformer\.|lora_transformer_|base_model\.model\.|lycoris_|lora_unet_|"
                               r"diffusion_model\.)*transformer_blocks[._]\d+[._]")
SD3_WIDTHS = tuple(sd3.WIDTHS)
# FLUX.1 (dev, schnell, Kontext) has 19 double blocks: a diffusers-layout file naming a later top-level block is
# for a deeper DiT with the same names (Qwen-Image: 60 blocks of width 3072; SD3.5-Large: 38).
FLUX1_DOUBLE_BLOCKS = flux.DOUBLE_BLOCKS
SD35_LARGE_BLOCKS = 38  # SD3's deepest model: a block past it is Qwen-Image's
QWEN_WIDTH = 3072  # Qwen-Image's hidden width (SD3's are SD3_WIDTHS)
_BLOCK_KEY = re.compile(r'"([^"]*?transformer_blocks[._](\d+)[._][^"]*)"')


def detect(keys: list[str], metadata: Mapping[str, str], shapes: Mapping[str, Shaped] | None = None) -> Family | str:
    """The family a LoRA file is for, or the name of one lorakit does not apply: keys first, then the input widths
    of a few layers, then metadata (``modelspec.architecture``, ``ss_base_model_version``), which is often stale —
    it decides only where the keys fit several families (``_Guess``), or none."""
    named = _by_keys(keys, shapes or {})
    meta = _by_metadata(metadata)
    if isinstance(named, _Guess):
        if meta is SD3 and named.default is FLUX1 and _unsettled_double_blocks(keys, shapes or {}):
            return SD3  # diffusers-layout double blocks whose widths are no full-size model's: metadata decides
        return meta if meta is not None and meta in named.choices else named.default
    if named is not None:
        return named
    return meta or SD


def alternatives(keys: list[str], metadata: Mapping[str, str], shapes: Mapping[str, Shaped] | None = None
                 ) -> tuple[Arch, ...]:
    """The other architectures a file fits when neither its keys nor its metadata decide (diffusers-named double
    blocks only: FLUX.1's, Chroma's or Qwen-Image's first blocks): a model of one of them takes it, saying so."""
    named = _by_keys(keys, shapes or {})
    if not isinstance(named, _Guess) or _by_metadata(metadata) is not None:
        return ()
    return tuple(f.arch for f in named.choices if isinstance(f, Family) and f.arch is not None)


@dataclass(frozen=True)
class _Guess:
    """Keys that fit several families: metadata naming one of ``choices`` picks it, else ``default``."""

    default: Family | str
    choices: tuple[Family | str, ...]


def _by_metadata(metadata: Mapping[str, str]) -> Family | str | None:
    meta = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    return next((FAMILIES.get(name, name) for marker, name in _META.items() if marker in meta), None)


def _by_keys(keys: list[str], shapes: Mapping[str, Shaped]) -> Family | str | _Guess | None:
    if any(flux.FLUX2.search(k) for k in keys) or _text_width(keys, shapes) in flux.FLUX2_TEXT_WIDTHS:
        return "FLUX.2"
    if any(flux.CHROMA.search(k) for k in keys):
        return CHROMA
    if any(qwen.KEYS.search(k) for k in keys):
        return QWEN_IMAGE
    if sd3.claims(keys):  # before FLUX.1's markers: SD3's final layer is named as FLUX's
        return SD3
    if any(flux.KEYS.search(k) for k in keys):  # Chroma's own files mostly carry FLUX.1's names only (kohya)
        return _Guess(FLUX1, (CHROMA,))
    doubles = [k for k in keys if _DIFFUSERS_DOUBLE.search(k)]
    if doubles:
        widths = _double_widths(doubles, shapes)
        if widths & set(SD3_WIDTHS):
            return SD3
        deepest = max(int(m[1]) for k in doubles if (m := re.search(r"transformer_blocks[._](\d+)", k)))
        if deepest < FLUX1_DOUBLE_BLOCKS and all(k.startswith("lora_unet_") for k in doubles):
            return _Guess(QWEN_IMAGE, (FLUX1, CHROMA))  # musubi-tuner's Qwen-Image names (kohya's FLUX.1: BFL ones)
        if deepest < FLUX1_DOUBLE_BLOCKS:  # FLUX.1's double blocks or the first blocks of a deeper DiT
            return _Guess(FLUX1, (CHROMA, QWEN_IMAGE))
        if deepest >= SD35_LARGE_BLOCKS or widths & {QWEN_WIDTH}:
            return QWEN_IMAGE
        return _Guess("Qwen-Image or Stable Diffusion 3", (QWEN_IMAGE,))
    for name, pattern in UNSUPPORTED:
        if any(pattern.search(k) for k in keys):
            return name
    return None


def _double_widths(doubles: list[str], shapes: Mapping[str, Shaped]) -> set[int]:
    """The input widths the factors of diffusers-layout double blocks show (LoRA's down, LoHa's ``w1_b``, LoKr's
    Kronecker factors: w1's columns × w2's)."""
    out: set[int] = set()
    for k in doubles:
        s = shapes.get(k)
        if s is None or len(s.shape) != 2:
            continue
        if re.search(r"lora_A|lora_down|down\.weight|hada_w1_b", k):
            out.add(int(s.shape[1]))
        elif k.endswith((".lokr_w1", ".lokr_w1_b")):
            base = k.rsplit(".", 1)[0]
            w2 = next((t for leaf in (".lokr_w2", ".lokr_w2_b") if (t := shapes.get(base + leaf)) is not None), None)
            if w2 is not None and len(w2.shape) == 2:
                out.add(int(s.shape[1]) * int(w2.shape[1]))
    return out


def _unsettled_double_blocks(keys: list[str], shapes: Mapping[str, Shaped]) -> bool:
    """Diffusers-layout double blocks whose widths are neither FLUX.1's (3072) nor SD3's (a tiny test model's, or
    none shown): FLUX.1 and SD3 files name them alike."""
    doubles = [k for k in keys if _DIFFUSERS_DOUBLE.search(k)]
    return bool(doubles) and not _double_widths(doubles, shapes) & {3072, *SD3_WIDTHS}


def depth_decides(keys: list[str], shapes: Mapping[str, Shaped] | None = None) -> bool:
    """Whether these keys are diffusers-layout DiT blocks only, whose family the deepest block index decides
    (FLUX.1's 19 double blocks or Qwen-Image's 60): a sample of a header's keys cannot say then (their widths may:
    SD3's)."""
    found = _by_keys(keys, shapes or {})
    return isinstance(found, _Guess) and QWEN_IMAGE in (found.default, *found.choices)


def deepest_block_keys(text: str) -> list[str]:
    """From a header's text (every key, in any order), the key of the deepest top-level ``transformer_blocks``
    block — what a sample of a header's keys may miss (safetensors sorts ``…blocks.9`` after ``…blocks.59``)."""
    best: tuple[int, str] | None = None
    for m in _BLOCK_KEY.finditer(text):
        if _DIFFUSERS_DOUBLE.search(m[1]) and (best is None or int(m[2]) > best[0]):
            best = (int(m[2]), m[1])
    return [] if best is None else [best[1]]


def _text_width(keys: list[str], shapes: Mapping[str, Shaped]) -> int | None:
    """The input width of the text embedder's LoRA (``txt_in``/``context_embedder`` down factor), if shown."""
    for k in keys:
        s = shapes.get(k)
        if s is not None and len(s.shape) == 2 and flux.TEXT_IN.search(k) and re.search(r"lora_A|lora_down", k):
            return int(s.shape[1])
    return None



# FLUX.1 control and Fill LoRAs widen ``img_in`` to take the control image's (or the masked image's and the
# mask's) latents beside the noise: 64 → 128 (Canny, Depth) or 384 (Fill) input features at full size.
FLUX1_WIDE_INPUTS = {128: "flux-1-dev-control", 384: "flux-1-fill-dev"}
FLUX1_VARIANTS = ("flux-1-dev", "flux-1-schnell", *FLUX1_WIDE_INPUTS.values(), "flux-1")  # what ``variant`` tells


def variant(family: Family, keys: list[str], metadata: Mapping[str, str],
            shapes: Mapping[str, Shaped] | None = None) -> str | None:
    """The finer base of a FLUX.1 LoRA (``flux-1-dev``, ``flux-1-schnell``, ``flux-1-dev-control``,
    ``flux-1-fill-dev``, else ``flux-1``): metadata when it names one, else a widened ``img_in``, else guidance
    layers (schnell has none); ``None`` for other families (their arch says it all)."""
    if family is not FLUX1:
        return None
    named = variant_from_metadata(metadata)
    if named is not None:
        return named
    for k in keys:
        s = (shapes or {}).get(k)
        if s is not None and len(s.shape) == 2 and flux.IMG_IN.search(k) and re.search(r"lora_A|lora_down", k):
            wide = FLUX1_WIDE_INPUTS.get(int(s.shape[1]))
            if wide:
                return wide
    return "flux-1-dev" if any(flux.GUIDANCE.search(k) for k in keys) else "flux-1"


def variant_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The FLUX.1 variant ``modelspec.architecture`` names (``flux-1-dev/lora``, OneTrainer's ``Flux.1-fill-dev/lora``
    → ``flux-1-fill-dev``), or ``None`` when it names none (``flux-1/lora``: kohya's "unknown")."""
    spec = metadata.get("modelspec.architecture", "").split("/", 1)[0].strip().lower().replace(".", "-")
    return spec if spec.startswith("flux-1-") else None


def foreign_name(keys: list[str], metadata: Mapping[str, str]) -> str | None:
    """The display name of the family a file is for when it is not Stable Diffusion (``FLUX.1``, ``Chroma``…)."""
    found = detect(keys, metadata)
    if isinstance(found, str):
        return found
    return None if found is SD else found.display
