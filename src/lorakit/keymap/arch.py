"""Which network a LoRA targets: SD1 / SD2 / SDXL from metadata, key names and tensor shapes. The model *family*
(Stable Diffusion, FLUX.1, and those refused by name) is decided first, in ``families.py``."""
from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



class Arch(StrEnum):
    """A Stable Diffusion architecture. A ``str`` (``Arch.SD1 == "sd1"``), so it travels through JSON, SQLite and
    the command line as its value."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    DEMO = "demo"  # the embedded demo model (SD1 architecture, tiny widths)
    FLUX1 = "flux1"  # FLUX.1 dev / schnell / Kontext (their LoRAs are interchangeable)
    CHROMA = "chroma"  # Chroma (FLUX.1-schnell-derived, T5 only; FLUX.1 LoRAs fit it: ``families.fits``)
    QWEN_IMAGE = "qwen-image"  # Qwen-Image and Qwen-Image-Edit (one transformer)
    UNKNOWN = "unknown"


SD1, SD2, SDXL, DEMO, FLUX1, UNKNOWN = Arch.SD1, Arch.SD2, Arch.SDXL, Arch.DEMO, Arch.FLUX1, Arch.UNKNOWN
LORA_BASES = (SD1, SD2, SDXL, FLUX1, Arch.CHROMA, Arch.QWEN_IMAGE, UNKNOWN)  # what a LoRA file can be made for
NAMES: dict[str, str] = {SD1: "Stable Diffusion 1.x", SD2: "Stable Diffusion 2.x", SDXL: "Stable Diffusion XL",
         DEMO: "the embedded demo model", FLUX1: "FLUX.1", Arch.CHROMA: "Chroma", Arch.QWEN_IMAGE: "Qwen-Image",
         UNKNOWN: "unknown"}
# The widths that tell the architectures apart — the one table of them (LoRA files, headers, models):
# the UNet's cross-attention context (the text width it reads) and the text encoders' hidden/MLP widths.
CROSS_DIM: dict[int, Arch] = {768: SD1, 1024: SD2, 2048: SDXL}
TE_WIDTH: dict[int, Arch] = {768: SD1, 1024: SD2}
# Header shapes (torch-free library summary): the demo model's widths (64 context; 64/128 text) count too there,
# since shapes decide before metadata; text widths include CLIP-G's 1280/5120 and the MLP widths.
CONTEXT_WIDTH: dict[int, Arch] = {**CROSS_DIM, 64: DEMO}
TEXT_WIDTH: dict[int, Arch] = {1280: SDXL, 5120: SDXL, 1024: SD2, 4096: SD2, 768: SD1, 3072: SD1, 64: DEMO, 128: DEMO}


def from_metadata(metadata: dict[str, str]) -> str | None:
    text = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "lorakit_demo" in text or "lorakit-demo" in text:  # trained on the embedded demo model (lorakit train)
        return DEMO
    if "xl" in text:
        return SDXL
    if "v2" in text or "sd_2" in text or metadata.get("ss_v2") == "True":
        return SD2
    if "v1" in text or "sd_1" in text:
        return SD1
    return None


def from_groups(groups: dict[str, dict[str, "torch.Tensor"]]) -> str | None:
    """From shapes and names of canonical groups: a second text encoder, SDXL-only layers, the cross-attention
    input width (768/1024/2048) or the text-encoder width (768/1024)."""
    if any(p.startswith("text_encoder_2.") or p.startswith("unet.add_embedding") for p in groups):
        return SDXL
    for path, leaves in groups.items():
        width = _input_width(leaves)
        if width is None:
            continue
        if path.startswith("unet.") and re.search(r"attn2\.to_[kv]$", path) and width in CROSS_DIM:
            return CROSS_DIM[width]
        if path.startswith("text_encoder.") and path.endswith("q_proj") and width in TE_WIDTH:
            return TE_WIDTH[width]
    if any(re.search(r"transformer_blocks\.[1-9]", p) for p in groups):
        return SDXL
    return None


def _input_width(leaves: dict[str, "torch.Tensor"]) -> int | None:
    for key in ("lora_down.weight", "hada_w1_b", "diff"):
        if key in leaves and leaves[key].dim() >= 2:
            return int(leaves[key].shape[1]) if key != "hada_w1_b" or leaves[key].dim() == 2 else None
    return None


def detect(groups: dict[str, dict[str, "torch.Tensor"]], metadata: dict[str, str]) -> str:
    """Shapes win over metadata (metadata is often copied from another run)."""
    return from_groups(groups) or from_metadata(metadata) or UNKNOWN
