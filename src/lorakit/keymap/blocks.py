"""Block ids of the LDM UNet (``IN00``…``IN11``, ``M00``, ``OUT00``…``OUT11``; ``BASE`` = text encoders) for a
canonical diffusers path. SD1/SD2 and SDXL use the same formula; SDXL simply has fewer blocks. FLUX.1's
transformer: ``D00``… (double blocks) and ``S00``… (single blocks)."""
from __future__ import annotations

import re

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)")
_DIT = re.compile(r"(single_)?transformer_blocks\.(\d+)\.")
DIT_GROUPS = {"D": "DOUBLE", "S": "SINGLE"}  # block id letter → the part that names all such blocks
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)")


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
