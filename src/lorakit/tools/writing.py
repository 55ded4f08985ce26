"""Writing a LoRA the tools made: canonical groups → a target dialect's state dict → a safetensors file (atomic,
with the ``sshs_*`` hashes), the report's summary in the metadata and its size in the report.

What a tool makes is checked before it is reported or written (``check_layers``: at least one layer, every value
finite — so ``--dry-run`` refuses what the real run would), and the file written is loaded back with ``load_lora``
before it is renamed into place: lorakit never leaves a file it would itself refuse."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import LorakitError, LoraFileError, ToolError
from ..formats.base import Grouped
from ..formats.writers import to_comfy, to_kohya, to_peft
from ..keymap.families import family_of_arch
from ..lora_model import all_finite, load_lora
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


def check_layers(groups: Grouped, report: ToolReport, dry_run: bool = False) -> None:
    """A tool's result must have only finite values (else a ``ToolError``) and at least one layer (else a
    ``ToolError`` that says why; a dry run's report says instead that the real run would refuse)."""
    if not groups:
        why = "; ".join(f"{what}: {reason}" for what, reason in report.left_out[:3])
        more = f" (and {len(report.left_out) - 3} more left out)" if len(report.left_out) > 3 else ""
        problem = f"no layer to write ({why + more if why else 'the inputs give none'})"
        if dry_run:
            report.notes.append(f"{problem}: a real run refuses this")
            return
        raise ToolError(f"{report.tool}: {problem}; a LoRA file without layers cannot be loaded")
    for path, leaves in groups.items():
        for leaf, t in leaves.items():
            if not all_finite(t):
                raise ToolError(f"{report.tool}: layer {path}: {leaf} holds NaN or infinite values (a weight or "
                                f"input too large for {t.dtype}?); nothing was written")


def write_lora(out: Path, groups: Grouped, arch: str, metadata: dict[str, str], report: ToolReport, *,
               target: str = "kohya", ldm_names: bool | None = None,
               embeddings: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Write ``groups`` to ``out`` (checked, then loaded back before the rename); returns the metadata as written
    (hashes included)."""
    check_layers(groups, report)
    sd, fmt_meta = state_dict_for(groups, arch, target, ldm_names=ldm_names, embeddings=embeddings)
    meta = {**metadata, **fmt_meta, **report.metadata()}
    written = write_safetensors(out, entries_of(sd), meta, sshs=True, finite=True, verify=loads_back(out))
    report.size_bytes = out.stat().st_size
    return written


def loads_back(out: Path) -> Callable[[Path], None]:
    """A check of the temporary file: ``load_lora`` reads it, with at least one layer."""
    def verify(tmp: Path) -> None:
        try:
            layers = len(load_lora(tmp).layers)
        except LorakitError as e:
            problem = e.problem if isinstance(e, LoraFileError) else str(e)
            raise ToolError(f"{out}: the file made does not load back ({problem}); it was not saved") from None
        if not layers:
            raise ToolError(f"{out}: the file made has no layers lorakit reads; it was not saved")
    return verify
