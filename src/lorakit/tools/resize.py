"""``resize``: a LoRA to another rank, per layer by a fixed rank or a dynamic rule (see ``svd``).

LoRA/LoCon layers: the exact SVD of up@down (two thin QRs), keep k singular values, α' = (α/r)·k so the kept part
acts with the layer's original strength (ΔW' = (α'/k)·up'@down' = (α/r)·U_kΣ_kV_kᵀ). A layer whose chosen k is
at least its rank is written unchanged, bit for bit — resizing to a rank ≥ the current one is lossless. DoRA
layers resize their inner LoRA and keep the magnitude. LoHa/LoKr/full/Tucker layers become LoRA layers when the
rule asks for fewer parameters than they have, else stay as they are; IA3/OFT/GLoRA/norm layers are kept as they
are. Every layer's relative error is measured on the factors as stored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import Adapter, DoRA, LoRA, kind_of
from ..layout import file_layout
from ..lora_model import LoraModel, load_lora
from .layers import Contribution, adapter_shape, dense_delta, flat, is_conv_kernel, layer_shape, lora_leaves
from .output import bar, check_output
from .report import LayerResult, ToolReport
from .sources import Source, lora_metadata, source_metadata
from .svd import RankRule, choose_rank, dense_error2, dense_svd, factor_error2, factored_svd
from .writing import check_layers, write_lora

Tensor = torch.Tensor
KEPT_KINDS = ("ia3", "oft", "boft", "glora", "norm")


@dataclass
class ResizeOptions:
    rule: RankRule
    dtype: torch.dtype | None = None  # default: each layer's own dtype
    device: str = "cpu"
    dry_run: bool = False


def resize(input_path: str | Path, output: str | Path | None, options: ResizeOptions) -> ToolReport:
    src = Path(input_path)
    out = Path(output) if output is not None else None
    if out is not None:
        check_output(out, [src])
    lora = load_lora(src)
    report = ToolReport("resize", None if options.dry_run else (str(out) if out else None))
    report.size_before = src.stat().st_size
    report.notes.append(f"rank rule: {options.rule.describe()}")
    groups: dict[str, dict[str, Tensor]] = {}
    for key in lora.leftovers:
        report.leave_out(key, "a key lorakit does not understand")
    layers = file_layout(lora.layers)  # FLUX.1: a fused layer of the file is resized whole, as the file has it
    for path, adapter in bar(sorted(layers.items()), desc="resizing", total=len(layers)):
        leaves = _layer(path, adapter, lora, options, report)
        if leaves:
            groups[path] = leaves
    check_layers(groups, report, options.dry_run)
    if out is not None and not options.dry_run:
        write_lora(out, groups, lora.arch, _metadata(src, lora, groups, report), report, embeddings=lora.embeddings)
    return report


def _layer(path: str, adapter: Adapter, lora: LoraModel, opts: ResizeOptions, report: ToolReport) \
        -> dict[str, Tensor]:
    kind = kind_of(adapter)
    device = torch.device(opts.device)
    if isinstance(adapter, DoRA) and _plain_lora(adapter.inner):
        leaves = _lora_layer(path, adapter.inner, kind, opts, report, "DoRA magnitude kept")
        return leaves | {"dora_scale": adapter.magnitude} if leaves else {}
    if _plain_lora(adapter):
        return _lora_layer(path, adapter, kind, opts, report)
    if kind in KEPT_KINDS or isinstance(adapter, DoRA):
        report.add(LayerResult(path, kind, adapter.rank, 0.0, 0.0, "kept as it is (not a low-rank ΔW)"))
        return dict(adapter.t)
    return _other_layer(path, adapter, kind, lora, opts, device, report)


def _plain_lora(adapter: Adapter) -> bool:
    return isinstance(adapter, LoRA) and adapter.low_rank() is not None


def _lora_layer(path: str, adapter: Adapter, kind: str, opts: ResizeOptions, report: ToolReport,
                note: str = "") -> dict[str, Tensor]:
    up, down, scale = adapter.low_rank()  # type: ignore[misc]
    shape = adapter_shape(adapter)
    assert shape is not None  # LoRA factors fix the weight shape
    rule = opts.rule.for_layer(is_conv_kernel(shape))
    if rule is None:
        report.leave_out(path, "k×k convolution and --conv-rank 0")
        return {}
    dec = factored_svd(up, down)
    r = int(up.shape[1])
    k = choose_rank(dec.s, rule)
    if k >= r or k == 0:  # a zero ΔW (k = 0) stays as it is too
        report.add(LayerResult(path, kind, r, 0.0, 0.0, "unchanged" + (f"; {note}" if note else "")))
        return dict(adapter.t)
    dtype = opts.dtype or adapter.t["lora_down.weight"].dtype
    new_up, new_down = dec.split(k, dtype)
    err2, norm2 = factor_error2(up, down, new_up.cpu(), new_down.cpu())
    report.add(LayerResult(path, kind, k, norm2 * scale ** 2, err2 * scale ** 2, note))
    return lora_leaves(new_up.cpu(), new_down.cpu(), scale * k, shape)


def _other_layer(path: str, adapter: Adapter, kind: str, lora: LoraModel, opts: ResizeOptions,
                 device: torch.device, report: ToolReport) -> dict[str, Tensor]:
    """LoHa/LoKr/full/Tucker: a LoRA when the rule makes it smaller, else the layer as it is."""
    rank = adapter.rank
    shape = layer_shape(path, [Contribution(adapter, 1.0)], None, lora.arch)
    rule = opts.rule.for_layer(is_conv_kernel(shape))
    if rule is None:
        report.leave_out(path, "k×k convolution and --conv-rank 0")
        return {}
    if rule.method == "rank" and rank is not None and rule.value >= rank:
        report.add(LayerResult(path, kind, rank, 0.0, 0.0, "unchanged"))
        return dict(adapter.t)
    m = dense_delta(path, [Contribution(adapter, 1.0)], shape, None, device).reshape(flat(shape))
    dec = dense_svd(m, rule)
    k = choose_rank(dec.s, rule, dec.total2)
    params = sum(t.numel() for t in adapter.t.values())
    if k == 0 or k * sum(flat(shape)) >= params:
        report.add(LayerResult(path, kind, rank, 0.0, 0.0, f"kept as {kind}: a rank-{k} LoRA would not be smaller"))
        return dict(adapter.t)
    dtype = opts.dtype or next(t.dtype for t in adapter.t.values() if t.is_floating_point())
    up, down = dec.split(k, dtype)
    report.add(LayerResult(path, kind, k, dec.total2, dense_error2(m, up, down), f"{kind} → LoRA"))
    return lora_leaves(up.cpu(), down.cpu(), k, shape)


def _metadata(src: Path, lora: LoraModel, groups: dict[str, dict[str, Tensor]], report: ToolReport) \
        -> dict[str, str]:
    from ..patch.weights import as_weight

    meta = {k: v for k, v in lora.metadata.items() if not k.startswith(("sshs_", "lorakit.", "lora_adapter"))}
    ranks = [int(g["lora_down.weight"].shape[0]) for g in groups.values() if "lora_down.weight" in g] or [0]
    alphas = [float(g["alpha"]) for g in groups.values() if "alpha" in g] or [0.0]
    new = lora_metadata(lora.arch, ranks, alphas, src.stem)
    meta.update({k: new[k] for k in ("ss_network_dim", "ss_network_alpha")})
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = (comment + "; " if comment and comment != "None" else "") + \
        f"rank resized by lorakit ({report.notes[0]})"
    sources = source_metadata("resize", [Source(src, lora, as_weight(1.0), "1")])
    meta |= {k: v for k, v in sources.items() if k.startswith("lorakit.")}  # the rest is the input's own
    meta["lorakit.resize"] = json.dumps({"from_ranks": lora.ranks, "to_ranks": sorted(set(ranks))})
    return meta
