"""``extract``: the difference of a fine-tuned model and its base as a LoRA, one layer at a time.

For every parameter both models have (UNet and text encoders; ``components`` narrows it): tensors that are bit-equal
are skipped; Linear/Conv weights that differ become LoRA/LoCon layers (truncated SVD of ΔW = W_tuned − W_base,
rank rule per layer, α = k, no clamping); norm layers that differ are written exactly (``w_norm``/``b_norm``);
every other difference (biases of Linear/Conv layers, embeddings, a layer left out by ``--min-diff`` or
``--conv-rank 0``, a shape that differs, a parameter only one model has) is listed in the report with its size —
nothing is dropped silently, the text encoder included (kohya drops it when its change is under ``min_diff``).

Peak memory is one layer of each model plus the factors kept: the weights are read tensor by tensor.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ToolError
from ..keymap.families import family_of_arch
from ..lora_model import all_finite
from .flux_extract import fused_weights
from .layers import flat, is_conv_kernel, lora_leaves
from .modelfile import ModelFile, open_model
from .output import bar, check_output
from .report import LayerResult, ToolReport
from .sources import lora_metadata
from .svd import RankRule, choose_rank, dense_error2, dense_svd
from .writing import check_layers, write_lora

Tensor = torch.Tensor
COMPONENT_SETS = {"unet": ("unet", "transformer"), "transformer": ("transformer",),
                  "te": ("text_encoder", "text_encoder_2", "text_encoder_3")}  # unet: the denoiser of any family


@dataclass
class ExtractOptions:
    rule: RankRule = field(default_factory=lambda: RankRule("rank", 32))
    components: tuple[str, ...] = ("unet", "te")
    min_diff: float = 0.0  # layers whose max |ΔW| is below this are left out (and reported)
    norms: bool = True  # write changed norm layers exactly
    dtype: torch.dtype | None = None  # default: the tuned model's dtype
    device: str = "cpu"
    dry_run: bool = False
    base_configs: Mapping[str, Mapping[str, Any]] | None = None  # single files of non-default configs
    tuned_configs: Mapping[str, Mapping[str, Any]] | None = None


def extract(base: str | Path, tuned: str | Path, output: str | Path | None,
            options: ExtractOptions | None = None) -> ToolReport:
    opts = options or ExtractOptions()
    if not (math.isfinite(opts.min_diff) and opts.min_diff >= 0):  # NaN would leave nothing out, silently
        raise ToolError(f"--min-diff must be a finite number ≥ 0, got {opts.min_diff:g}")
    out = Path(output) if output is not None else None
    if out is not None:
        check_output(out, [Path(base), Path(tuned)])
    mb, mt = open_model(base, opts.base_configs), open_model(tuned, opts.tuned_configs)
    if mb.arch != mt.arch:
        raise ToolError(f"{tuned} is {mt.arch}, {base} is {mb.arch}: extract needs a model and its base")
    _check_pair(mb, mt, opts)
    report = ToolReport("extract", None if opts.dry_run else (str(out) if out else None))
    report.notes.append(f"rank rule: {opts.rule.describe()}")
    groups = _extract_layers(mb, mt, opts, report)
    if not groups:
        _nothing_to_extract(base, tuned, opts, report)
    check_layers(groups, report, opts.dry_run)
    if out is not None and not opts.dry_run:
        ranks = [int(g["lora_down.weight"].shape[0]) for g in groups.values() if "lora_down.weight" in g] or [0]
        meta = lora_metadata(mb.arch, ranks, [float(r) for r in ranks], out.stem)
        meta |= {"lorakit.tool": "extract", "lorakit.sources": json.dumps([_model_source(mb, "base"),
                                                                           _model_source(mt, "tuned")])}
        write_lora(out, groups, mb.arch, meta, report)
    return report


def _check_pair(mb: ModelFile, mt: ModelFile, opts: ExtractOptions) -> None:
    """Before any tensor is read: most tensors of the compared components must be in both models with the same
    shape (a fine-tune changes values, not shapes — at most a token embedding grows); else a ``ToolError``."""
    wanted = _components(opts)
    names = [n for n in set(mb.params) | set(mt.params) if n.split(".", 1)[0] in wanted]
    same = sum(1 for n in names if n in mb.params and n in mt.params and mb.shape(n) == mt.shape(n))
    if not same or 2 * same < len(names):
        raise ToolError(f"{mt.path} and {mb.path} share {same} of {len(names)} tensors (same name and shape) in "
                        f"{','.join(opts.components)}: they are not a model and its base (different architectures?)")


def _nothing_to_extract(base: str | Path, tuned: str | Path, opts: ExtractOptions, report: ToolReport) -> None:
    """Identical models are a ``ToolError`` (an empty LoRA cannot be loaded)."""
    if not report.layers and not report.left_out:
        raise ToolError(f"{tuned} and {base} are identical in {','.join(opts.components)}: there is no difference to "
                        "extract")


def _components(opts: ExtractOptions) -> set[str]:
    out: set[str] = set()
    for c in opts.components:
        if c not in COMPONENT_SETS:
            raise ToolError(f"unknown component {c!r}; use unet (or transformer), te")
        out.update(COMPONENT_SETS[c])
    return out


def _extract_layers(mb: ModelFile, mt: ModelFile, opts: ExtractOptions, report: ToolReport) \
        -> dict[str, dict[str, Tensor]]:
    wanted = _components(opts)
    names = sorted(n for n in set(mb.params) | set(mt.params) if n.split(".", 1)[0] in wanted)
    for comp in sorted({n.split(".", 1)[0] for n in set(mb.params) | set(mt.params)} - wanted):
        report.notes.append(f"{comp} not compared (--components {','.join(opts.components)})")
    report.notes.append("the VAE is not compared: LoRA files do not change it")
    groups: dict[str, dict[str, Tensor]] = {}
    device = torch.device(opts.device)
    family = family_of_arch(mb.arch)
    fused, done = fused_weights(mb, mt, wanted, report, family) if family.layout is not None else ([], set())
    for name, base, tuned in fused:  # FLUX.1's fused layers, whole (BFL names)
        _one(name, base(), tuned(), mb, opts, device, groups, report)
    for name in bar(names, desc="extracting", total=len(names)):
        if name in done:
            continue
        if name not in mb.params or name not in mt.params:
            report.leave_out(name, f"only in the {'tuned' if name in mt.params else 'base'} model")
            continue
        if mb.shape(name) != mt.shape(name):
            report.leave_out(name, f"shape {mt.shape(name)} in the tuned model, {mb.shape(name)} in the base")
            continue
        _one(name, mb.values(name), mt.values(name), mb, opts, device, groups, report)  # fp8: dequantized
    return groups


def _one(name: str, w_base: Tensor, w_tuned: Tensor, mb: ModelFile, opts: ExtractOptions, device: torch.device,
         groups: dict[str, dict[str, Tensor]], report: ToolReport) -> None:
    if torch.equal(w_base, w_tuned):
        return
    diff = w_tuned.to(device, torch.float32) - w_base.to(device, torch.float32)
    if not all_finite(diff):
        which = "base model" if not all_finite(w_base) else "tuned model" if not all_finite(w_tuned) else \
            "difference of the two models"
        raise ToolError(f"{name}: the {which} holds NaN or infinite values; no LoRA can be extracted from it")
    biggest = float(diff.abs().max())
    module, _, leaf = name.rpartition(".")
    if biggest < opts.min_diff:
        report.leave_out(name, f"max |Δ| {biggest:.3g} below --min-diff {opts.min_diff:g}")
        return
    dtype = opts.dtype or w_tuned.dtype
    if leaf == "weight" and diff.dim() in (2, 4) and not _embedding(module):
        leaves = _low_rank(module, diff, opts, dtype, report)
        if leaves:
            groups[module] = leaves
    elif diff.dim() == 1 and opts.norms and mb.shape(f"{module}.weight") == (diff.numel(),):
        norm = groups.setdefault(module, {})
        norm["w_norm" if leaf == "weight" else "b_norm"] = diff.to(dtype).cpu()
        norm.setdefault("w_norm", torch.zeros(diff.numel(), dtype=dtype))
        report.add(LayerResult(name, "norm", None, float(diff.double().pow(2).sum()),
                               float((diff.double().cpu() - norm["w_norm" if leaf == "weight" else "b_norm"]
                                      .double()).pow(2).sum())))
    else:
        what = "a bias of a LoRA layer" if leaf == "bias" else "an embedding or other tensor"
        report.leave_out(name, f"changed (max |Δ| {biggest:.3g}, ‖Δ‖ {float(diff.norm()):.3g}); {what} has no "
                               "place in a LoRA file")


def _embedding(module: str) -> bool:
    """CLIP's ``embeddings.*``, T5's ``shared``/``embed_tokens``/``relative_attention_bias``: tables, not layers."""
    return ".embeddings." in f".{module}." or module.rsplit(".", 1)[-1] in ("shared", "embed_tokens",
                                                                          "relative_attention_bias")


def _low_rank(module: str, diff: Tensor, opts: ExtractOptions, dtype: torch.dtype, report: ToolReport) \
        -> dict[str, Tensor]:
    shape = tuple(diff.shape)
    rule = opts.rule.for_layer(is_conv_kernel(shape))
    if rule is None:
        report.leave_out(module, f"k×k convolution changed (‖Δ‖ {float(diff.norm()):.3g}) and --conv-rank 0")
        return {}
    m = diff.reshape(flat(shape))
    dec = dense_svd(m, rule)
    k = choose_rank(dec.s, rule, dec.total2)
    up, down = dec.split(k, dtype)
    report.add(LayerResult(module, "diff", k, dec.total2, dense_error2(m, up, down), dec.method))
    return lora_leaves(up.cpu(), down.cpu(), k, shape)


def _model_source(m: ModelFile, role: str) -> dict[str, object]:
    from ..files.hashes import cached_sha256

    return {"role": role, "file": m.path.name, "form": m.form,
            "sha256": {str(f.path.relative_to(m.path) if m.form == "folder" else f.path.name): cached_sha256(f.path)
                       for f in m.files}}
