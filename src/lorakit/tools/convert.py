"""``convert``: a LoRA file into another dialect, tensor for tensor.

``kohya`` holds every type lorakit reads; ``peft`` and ``diffusers`` write the same file — diffusers' LoRA files
are PEFT state dicts per component (``unet.…lora_A.weight``) with α, r and the target modules in the
``lora_adapter_metadata`` header key — and hold LoRA/LoCon and per-output DoRA layers. The tensors are written as read — converting there and back gives them back
unchanged (a PEFT file's α comes from its header, not from the rounded fp32 scale) — and whatever the target
cannot hold (a layer type, bundled embeddings, keys lorakit does not understand) is an error that names it, or,
with ``drop_unsupported``, left out and listed in the report.

FLUX.1 and SD3 files (``flux_layout``): ``kohya`` and ``comfy`` (ComfyUI's BFL/SAI-PEFT names) are written in the
original layout (BFL, SAI) — fused layers as the file had them, parts of a fused layer fused back exactly where they
can be — and ``peft``/``diffusers`` per model module, where a non-LoRA change of a fused layer has no form.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import kind_of
from ..errors import ToolError
from ..formats.base import Grouped
from ..formats.writers import exact_alphas, peft_problem
from ..keymap.families import family_of_arch
from ..layout import file_layout
from ..lora_model import LoraModel, load_lora
from ..patch.weights import as_weight
from .flux_layout import convert_groups
from .layers import leaves_of
from .output import check_output
from .report import LayerResult, ToolReport
from .sources import Source, source_metadata
from .writing import TARGETS, check_layers, write_lora

DROPPED_META = ("sshs_", "lora_adapter_metadata", "format", "lorakit.")


@dataclass
class ConvertOptions:
    to: str = "kohya"
    ldm_names: bool | None = None  # kohya UNet names: LDM (default for SDXL) or diffusers
    drop_unsupported: bool = False
    dry_run: bool = False


def convert(input_path: str | Path, output: str | Path | None, options: ConvertOptions | None = None) -> ToolReport:
    opts = options or ConvertOptions()
    if opts.to not in TARGETS:
        raise ToolError(f"unknown target {opts.to!r}; use one of {', '.join(TARGETS)}")
    src = Path(input_path)
    out = Path(output) if output is not None else None
    if out is not None:
        check_output(out, [src])
    lora = load_lora(src)
    report = ToolReport(f"convert → {opts.to}", None if opts.dry_run else (str(out) if out else None))
    report.size_before = src.stat().st_size
    family = family_of_arch(lora.arch)
    if family.layout is not None:  # FLUX.1, SD3: the original layout (BFL, SAI) in kohya / comfy files
        groups, kept, problems = convert_groups(lora, opts.to, family)
        report.notes += [f"{what}: {why}" for what, why in kept]
    elif opts.to == "comfy":
        raise ToolError(f"{src}: --to comfy writes FLUX.1 LoRAs (BFL names) and SD3 LoRAs (SAI names); this one "
                        f"is for {lora.arch} — use kohya")
    else:
        groups, problems = canonical_groups(lora), []
    embeddings = dict(lora.embeddings)
    _unsupported(lora, groups, embeddings, opts, report, problems)
    named = {**file_layout(lora.layers), **lora.layers}
    for path, leaves in groups.items():
        adapter = named.get(path)
        kind = kind_of(adapter) if adapter is not None else "lora (parts fused)"
        rank = int(leaves["lora_down.weight"].shape[0]) if "lora_down.weight" in leaves else None
        report.add(LayerResult(path, kind, rank, 0.0, 0.0))
    check_layers(groups, report, opts.dry_run)
    if out is not None and not opts.dry_run:
        meta = {k: v for k, v in lora.metadata.items() if not k.startswith(DROPPED_META)}
        sources = source_metadata("convert", [Source(src, lora, as_weight(1.0), "1")])
        meta |= {k: v for k, v in sources.items() if k.startswith("lorakit.")}  # the rest is the input's own
        write_lora(out, groups, lora.arch, meta, report, target=opts.to, ldm_names=opts.ldm_names,
                   embeddings=embeddings if opts.to == "kohya" else None)
    return report


def canonical_groups(lora: LoraModel) -> Grouped:
    """Each layer's leaves as read (a DoRA wrapper's magnitude beside its inner adapter's tensors); a PEFT file's
    α put back from its header."""
    groups = {path: leaves_of(a) for path, a in lora.layers.items()}
    return exact_alphas(groups, lora.metadata) if lora.dialect == "peft" else groups


def _unsupported(lora: LoraModel, groups: Grouped, embeddings: dict[str, torch.Tensor], opts: ConvertOptions,
                 report: ToolReport, found: list[tuple[str, str]]) -> None:
    """Collect what the target cannot hold (``found``: what the layout already found); raise unless
    ``drop_unsupported`` (then leave it out, reported)."""
    problems: list[tuple[str, str]] = [(k, "a key lorakit does not understand") for k in lora.leftovers] + found
    if opts.to != "kohya":
        problems += [(f"embedding {n}", f"{opts.to} files have no bundled embeddings") for n in embeddings]
    if opts.to in ("peft", "diffusers"):
        problems += [(p, msg) for p, leaves in groups.items() if (msg := peft_problem(p, leaves))]
    if problems and not opts.drop_unsupported:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ToolError(f"{lora.path}: cannot convert losslessly to {opts.to}: {problems[0][0]}: {problems[0][1]}"
                        f"{more}; --drop-unsupported leaves such parts out (listed in the report)")
    for what, why in problems:
        report.leave_out(what, why)
        groups.pop(what, None)
    if opts.to != "kohya":
        embeddings.clear()
