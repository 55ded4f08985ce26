"""Block ids of the LDM UNet (``IN00``…``IN11``, ``M00``, ``OUT00``…``OUT11``; ``BASE`` = text encoders) for a
canonical diffusers path. SD1/SD2 and SDXL use the same formula; SDXL simply has fewer blocks. FLUX.1's
transformer: ``D00``… (double blocks) and ``S00``… (single blocks)."""
from __future__ import annotations

import re
from dataclasses import dataclass

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)")
_DIT = re.compile(r"(single_)?transformer_blocks\.(\d+)\.")
DIT_GROUPS = {"D": "DOUBLE", "S": "SINGLE"}  # block id letter → the part that names all such blocks
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)")


@dataclass(frozen=True)
class BlockVector:
    """A lora-block-weight vector's layout (told apart by its length): the block id each value weights, in order;
    ``label``: the models it is for and ``layout``: what its values are, for messages. A family lists the vectors
    its models take (``Family.lbw``)."""

    label: str
    blocks: tuple[str, ...]
    layout: str = ""


_IN = tuple(f"IN{i:02d}" for i in range(12))
_OUT = tuple(f"OUT{i:02d}" for i in range(12))
# the UNet vectors of sd-webui-lora-block-weight: LoRA (attention blocks only) and LoCon (every block)
SD_VECTORS = (BlockVector("SD1/SD2", ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + _OUT[3:12]),
              BlockVector("SD1/SD2", ("BASE",) + _IN + ("M00",) + _OUT))
SDXL_VECTORS = (BlockVector("SDXL", ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + _OUT[0:6]),
                BlockVector("SDXL", ("BASE",) + _IN[0:9] + ("M00",) + _OUT[0:9]))


def dit_vector(label: str, double: int, single: int) -> BlockVector:
    """A DiT's vector as ComfyUI's and Forge's block-weight tools lay it out: ``BASE``, the double blocks, the
    single blocks."""
    blocks = ("BASE", *(f"D{i:02d}" for i in range(double)), *(f"S{i:02d}" for i in range(single)))
    return BlockVector(label, blocks, f"BASE, {double} double, {single} single")


def block_id(canonical_path: str, last_out: int = 11) -> str | None:
    """``unet.down_blocks.1.attentions.0.…`` → ``IN04``; text encoders → ``BASE``; time embeddings → ``None``
    (not part of any block: block weights leave them at the UNet weight). ``conv_out`` counts as the last
    output block (``last_out``)."""
    component, _, path = canonical_path.partition(".")
    if component.startswith("text_encoder"):
        return "BASE"
    if component == "transformer":  # FLUX.1: D00… double blocks, S00… single blocks; embedders, final layer: none
        m = _DIT.match(path)
        return None if m is None else f"{'S' if m[1] else 'D'}{int(m[2]):02d}"
    if path.startswith("conv_in"):
        return "IN00"
    if path.startswith("mid_block"):
        return "M00"
    if path.startswith(("conv_out", "conv_norm_out")):
        return f"OUT{last_out:02d}"
    m = _DOWN.match(path)
    if m:
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{3 * i + j + 1:02d}"
    m = _UP.match(path)
    if m:
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    return None
