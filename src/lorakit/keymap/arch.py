"""Which network a LoRA targets: SD1 / SD2 / SDXL from metadata, key names and tensor shapes; SD3, Flux and other
non-SD families recognised by name so they can be refused clearly."""
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
    UNKNOWN = "unknown"


SD1, SD2, SDXL, DEMO, UNKNOWN = Arch.SD1, Arch.SD2, Arch.SDXL, Arch.DEMO, Arch.UNKNOWN
LORA_BASES = (SD1, SD2, SDXL, UNKNOWN)  # what a LoRA file can be made for
NAMES: dict[str, str] = {SD1: "Stable Diffusion 1.x", SD2: "Stable Diffusion 2.x", SDXL: "Stable Diffusion XL",
         DEMO: "the embedded demo model", UNKNOWN: "unknown"}

# Markers of model families lorakit does not apply (matched against raw keys).
FOREIGN: list[tuple[str, re.Pattern[str]]] = [
    ("Flux", re.compile(r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn|"
                        r"transformer\.x_embedder|context_embedder.*flux")),
    ("Stable Diffusion 3", re.compile(r"joint_blocks|context_block|x_block|transformer\.transformer_blocks\.\d+\.attn"
                                      r"\.add_q_proj")),
    ("a transformer (DiT) model such as SD3, Flux, PixArt or Hunyuan", re.compile(r"^(lora_)?transformer[._]")),
]
_META_FOREIGN = {"flux": "Flux", "sd3": "Stable Diffusion 3", "stable-diffusion-v3": "Stable Diffusion 3",
                 "pixart": "PixArt", "hunyuan": "Hunyuan", "auraflow": "AuraFlow", "cascade": "Stable Cascade"}
# The widths that tell the architectures apart — the one table of them (LoRA files, headers, models):
# the UNet's cross-attention context (the text width it reads) and the text encoders' hidden/MLP widths.
CROSS_DIM: dict[int, Arch] = {768: SD1, 1024: SD2, 2048: SDXL}
TE_WIDTH: dict[int, Arch] = {768: SD1, 1024: SD2}
# Header shapes (torch-free library summary): the demo model's widths (64 context; 64/128 text) count too there,
# since shapes decide before metadata; text widths include CLIP-G's 1280/5120 and the MLP widths.
CONTEXT_WIDTH: dict[int, Arch] = {**CROSS_DIM, 64: DEMO}
TEXT_WIDTH: dict[int, Arch] = {1280: SDXL, 5120: SDXL, 1024: SD2, 4096: SD2, 768: SD1, 3072: SD1, 64: DEMO, 128: DEMO}


def foreign_family(keys: list[str], metadata: dict[str, str]) -> str | None:
    """The name of a non-SD model family the file is for, or ``None``."""
    for family, pattern in FOREIGN:
        if any(pattern.search(k) for k in keys):
            return family
    meta = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    for marker, family in _META_FOREIGN.items():
        if marker in meta:
            return family
    return None


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
