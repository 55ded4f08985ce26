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
    # Stable Diffusion 3 / 3.5: three sizes whose LoRAs do not fit each other (``keymap/sd3.py`` tells them apart)
    SD3_MEDIUM = "sd3-medium"  # 1536 wide, 24 blocks
    SD35_MEDIUM = "sd3.5-medium"  # 1536 wide, 24 blocks, qk-norm, a second attention (attn2) in blocks 0–12
    SD35_LARGE = "sd3.5-large"  # 2432 wide, 38 blocks, qk-norm (and Large Turbo)
    SD3_MEDIUMS = "sd3.x-medium"  # a 1536-wide LoRA that does not show which Medium: fits both
    SD3 = "sd3"  # an SD3 LoRA whose size its layers do not show (text encoders only): fits every SD3 model
    CHROMA = "chroma"  # Chroma (FLUX.1-schnell-derived, T5 only; FLUX.1 LoRAs fit it: ``families.fits``)
    QWEN_IMAGE = "qwen-image"  # Qwen-Image and Qwen-Image-Edit (one transformer)
    UNKNOWN = "unknown"


SD1, SD2, SDXL, DEMO, FLUX1, UNKNOWN = Arch.SD1, Arch.SD2, Arch.SDXL, Arch.DEMO, Arch.FLUX1, Arch.UNKNOWN
SD3_SIZES = (Arch.SD3_MEDIUM, Arch.SD35_MEDIUM, Arch.SD35_LARGE)  # what an SD3 model is
SD3_BASES = (*SD3_SIZES, Arch.SD3_MEDIUMS, Arch.SD3)  # what an SD3 LoRA can be made for
LORA_BASES = (SD1, SD2, SDXL, FLUX1, *SD3_BASES, Arch.CHROMA, Arch.QWEN_IMAGE, UNKNOWN)  # what a LoRA can be made for
NAMES: dict[str, str] = {SD1: "Stable Diffusion 1.x", SD2: "Stable Diffusion 2.x", SDXL: "Stable Diffusion XL",
         DEMO: "the embedded demo model", FLUX1: "FLUX.1", Arch.SD3_MEDIUM: "Stable Diffusion 3 Medium",
         Arch.SD35_MEDIUM: "Stable Diffusion 3.5 Medium", Arch.SD35_LARGE: "Stable Diffusion 3.5 Large",
         Arch.SD3_MEDIUMS: "Stable Diffusion 3 or 3.5 Medium", Arch.SD3: "Stable Diffusion 3 (any size)",
         Arch.CHROMA: "Chroma", Arch.QWEN_IMAGE: "Qwen-Image", UNKNOWN: "unknown"}
# A LoRA architecture that stands for several model architectures (its file does not show which one).
COVERS: dict[str, frozenset[str]] = {Arch.SD3_MEDIUMS: frozenset({Arch.SD3_MEDIUM, Arch.SD35_MEDIUM}),
                                     Arch.SD3: frozenset(SD3_SIZES)}


def fits(lora_arch: str, model_arch: str) -> bool:
    """Whether a LoRA made for ``lora_arch`` may apply to a ``model_arch`` model: the same architecture, one that
    covers it (an SD3 LoRA of unshown size), or either unknown."""
    return UNKNOWN in (lora_arch, model_arch) or lora_arch == model_arch or model_arch in COVERS.get(lora_arch, ())
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
