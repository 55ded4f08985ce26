"""Writing a LoRA the tools made: canonical groups → a target dialect's state dict → a safetensors file (atomic,
with the ``sshs_*`` hashes), the report's summary in the metadata and its size in the report."""
from __future__ import annotations

from pathlib import Path

import torch

from ..formats.base import Grouped
from ..formats.writers import to_comfy_flux, to_kohya, to_peft
from ..keymap.arch import Arch
from .flux_layout import original_layout
from .output import entries_of, write_safetensors
from .report import ToolReport

TARGETS = ("kohya", "peft", "diffusers", "comfy")  # comfy: FLUX.1's BFL-PEFT files


def state_dict_for(groups: Grouped, arch: str, target: str = "kohya", *, ldm_names: bool | None = None,
                   embeddings: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, str]]:
    """Tensors and format metadata of ``groups`` in ``target`` (kohya | peft | diffusers | comfy). FLUX.1 kohya and
    comfy files are in the original (BFL) layout wherever a layer has one (``flux_layout.original_layout``)."""
    if arch == Arch.FLUX1 and target in ("kohya", "comfy"):
        groups = original_layout(groups)[0]
    if target == "kohya":
        return to_kohya(groups, arch, ldm_names=ldm_names, embeddings=embeddings), {}
    if target == "comfy":
        return to_comfy_flux(groups), {}
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
