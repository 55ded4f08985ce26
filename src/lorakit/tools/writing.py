"""Writing a LoRA the tools made: canonical groups → a target dialect's state dict → a safetensors file (atomic,
with the ``sshs_*`` hashes), the report's summary in the metadata and its size in the report."""
from __future__ import annotations

from pathlib import Path

import torch

from ..formats.base import Grouped
from ..errors import ToolError
from ..formats.writers import to_comfy, to_kohya, to_peft
from ..keymap.families import family_of_arch
from .flux_layout import original_layout
from .output import entries_of, write_safetensors
from .report import ToolReport

TARGETS = ("kohya", "peft", "diffusers", "comfy")  # comfy: FLUX.1's BFL-PEFT / SD3's SAI-PEFT files


def state_dict_for(groups: Grouped, arch: str, target: str = "kohya", *, ldm_names: bool | None = None,
                   embeddings: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, str]]:
    """Tensors and format metadata of ``groups`` in ``target`` (kohya | peft | diffusers | comfy). The kohya and
    comfy files of a family with an original layout (FLUX.1's BFL, SD3's SAI) are in it wherever a layer has one
    (``flux_layout.original_layout``)."""
    family = family_of_arch(arch)
    if family.layout is None and target == "comfy":
        raise ToolError(f"--to comfy writes the LoRAs of FLUX.1 and SD3 (their original layout); this one is for "
                        f"{arch} — use kohya")
    if family.layout is not None and target in ("kohya", "comfy"):
        groups = original_layout(groups, family)[0]
    if target == "kohya":
        return to_kohya(groups, arch, ldm_names=ldm_names, embeddings=embeddings), {}
    if target == "comfy":
        return to_comfy(groups, family), {}
    return to_peft(groups, arch)  # diffusers' own LoRA files are PEFT state dicts per component


def write_lora(out: Path, groups: Grouped, arch: str, metadata: dict[str, str], report: ToolReport, *,
               target: str = "kohya", ldm_names: bool | None = None,
               embeddings: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Write ``groups`` to ``out``; returns the metadata as written (hashes included)."""
    sd, fmt_meta = state_dict_for(groups, arch, target, ldm_names=ldm_names, embeddings=embeddings)
    meta = {**metadata, **fmt_meta, **report.metadata()}
    written = write_safetensors(out, entries_of(sd), meta, sshs=True)
    report.size_bytes = out.stat().st_size
    return written
