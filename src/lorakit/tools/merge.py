"""``merge``: several LoRAs with their weights → one LoRA file.

``concat`` (the default when every layer of every input is LoRA/LoCon): exact. Per layer the inputs' factors are
stacked along the rank, each part scaled by cᵢ = mᵢ·αᵢ/rᵢ (its weight times its own scale; √|cᵢ| on both
factors, the sign on ``up``), and α = Σrᵢ, so the file applied at 1.0 adds Σ mᵢ·ΔWᵢ — what applying the inputs
adds (kohya's merge adds (ΣUᵢ)(ΣDᵢ): cross terms, weights squared). Tucker LoCon layers stack their cores
block-diagonally.

``svd``: any types (LoHa, LoKr, full, DoRA, …). Per layer ΔW = Σ mᵢ·ΔWᵢ (exactly decomposed through QR when
every part is low-rank, else dense), truncated by the rank rule, no clamping; each layer's relative Frobenius
error is measured on the factors as stored. Types whose ΔW depends on the base weight (DoRA, OFT, IA3, GLoRA)
need ``base`` and are fixed at the given strength (noted per layer). Norm layers (``w_norm``/``b_norm``) are
summed exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import Norm
from ..errors import ToolError, WeightSpecError
from ..keymap.arch import Arch
from ..keymap.families import Family, family_of_arch
from .layers import (
    LOW_RANK_KINDS,
    Contribution,
    check_same_shape,
    dense_delta,
    flat,
    is_conv_kernel,
    layer_shape,
    lora_leaves,
    tucker_delta,
)
from .flux_layout import noted_layout
from .flux_merge import bind_parts, concat_fused, fused_layer
from .modelfile import ModelFile, open_model
from .output import check_output
from .report import LayerResult, ToolReport
from .sources import Source, common_arch, load_sources, lora_metadata, source_metadata
from .svd import RankRule, choose_rank, dense_error2, dense_svd, factor_error2, factored_svd
from .writing import check_layers, write_lora

Tensor = torch.Tensor
Groups = dict[str, dict[str, Tensor]]


@dataclass
class MergeOptions:
    method: str | None = None  # "concat" | "svd"; None: concat when possible
    rule: RankRule | None = None  # svd: default = the sum of the input ranks (lossless for LoRA inputs)
    base: str | Path | None = None  # model whose weights DoRA/OFT/IA3/GLoRA layers need (svd)
    dtype: torch.dtype | None = None  # default: the inputs' factor dtype
    device: str = "cpu"
    dry_run: bool = False
    conv_rank: int | None = None  # with no rule: the rank of k×k convolutions (0 leaves them out)


def merge(inputs: Sequence[str | Source], output: str | Path | None, options: MergeOptions | None = None) \
        -> ToolReport:
    """Merge ``inputs`` (``FILE[:weights]`` or ``Source``) into ``output``; returns the report."""
    opts = options or MergeOptions()
    sources = [s for s in inputs if isinstance(s, Source)] + load_sources([s for s in inputs if isinstance(s, str)])
    if not sources:
        raise ToolError("merge needs at least one LoRA")
    out = Path(output) if output is not None else None
    if out is not None:
        check_output(out, [s.path for s in sources] + ([Path(opts.base)] if opts.base else []))
    base = open_model(opts.base) if opts.base else None  # checked whatever the method: a bad --base is named
    arch = common_arch(s.lora for s in sources)
    layers = _contributions(sources, arch)
    method = opts.method or ("concat" if all(_stackable(cs) for cs in layers.values()) else "svd")
    report = ToolReport(f"merge ({method})", None if opts.dry_run else (str(out) if out else None))
    dtype = opts.dtype or _input_dtype(sources)
    family = family_of_arch(arch)
    if method == "concat":
        groups = _concat_all(layers, dtype, report, family)
    elif method == "svd":
        groups = _svd_all(layers, arch, opts, base, dtype, report)
    else:
        raise ToolError(f"unknown merge method {method!r}; use concat or svd")
    if family.layout is not None:  # BFL / SAI names; fused layers whose parts cannot fuse are said
        groups = noted_layout(groups, report, family)
    _leave_out_zero(sources, layers, report)
    for s in sources:
        for key in s.lora.leftovers:
            report.leave_out(f"{s.path.name}: {key}", "a key lorakit does not understand")
        for name in s.lora.embeddings:
            report.leave_out(f"{s.path.name}: embedding {name}", "bundled embeddings are not merged")
    check_layers(groups, report, opts.dry_run)
    if out is not None and not opts.dry_run:
        meta = source_metadata("merge", sources) | {"lorakit.method": method}
        ranks = [int(g["lora_down.weight"].shape[0]) for g in groups.values() if "lora_down.weight" in g] or [0]
        meta |= lora_metadata(arch, ranks, [float(r) for r in ranks], out.stem)
        write_lora(out, groups, arch, meta, report)
    return report


def _contributions(sources: Sequence[Source], arch: str) -> dict[str, list[Contribution]]:
    layers: dict[str, list[Contribution]] = {}
    for s in sources:
        for path, adapter in s.lora.layers.items():
            try:
                strength = s.weight.for_path(path, arch)
            except WeightSpecError as e:
                raise ToolError(f"{s.path}: {e}") from None
            if strength != 0.0:
                layers.setdefault(path, []).append(Contribution(adapter, strength, s.weight.dyn, s.path.name))
    for path, contribs in layers.items():
        check_same_shape(path, contribs, fused_layer(path, family_of_arch(arch)))
    return layers


def _stackable(contribs: Sequence[Contribution]) -> bool:
    """LoRA/LoCon factors that stack exactly: all plain, or all Tucker."""
    return all(c.kind in LOW_RANK_KINDS for c in contribs) and \
        len({c.kind == "locon-tucker" for c in contribs}) == 1


def _leave_out_zero(sources: Sequence[Source], layers: dict[str, list[Contribution]], report: ToolReport) -> None:
    zero = sorted({p for s in sources for p in s.lora.layers if p not in layers})
    for path in zero:
        report.leave_out(path, "weight 0 in every input (nothing to add)")


def _input_dtype(sources: Sequence[Source]) -> torch.dtype:
    dtypes = [t.dtype for s in sources for a in s.lora.layers.values() for t in getattr(a, "inner", a).t.values()
              if t.is_floating_point() and t.dim() >= 2]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


# -- concat ----------------------------------------------------------------------------------------------------

def _concat_all(layers: dict[str, list[Contribution]], dtype: torch.dtype, report: ToolReport,
                family: Family) -> Groups:
    from .output import bar

    groups, layers = concat_fused(layers, dtype, report, family)  # FLUX.1's / SD3's fused layers, whole
    for path, contribs in bar(sorted(layers.items()), desc="merging", total=len(layers)):
        bad = [c for c in contribs if c.kind not in LOW_RANK_KINDS]
        if bad:
            raise ToolError(f"layer {path}: {bad[0].source} is {bad[0].kind} here; concat stacks LoRA/LoCon factors "
                            "only — use --method svd")
        tucker = {c.kind == "locon-tucker" for c in contribs}
        if len(tucker) > 1:
            raise ToolError(f"layer {path}: mixes Tucker and plain LoCon factors, which do not stack; use "
                            "--method svd")
        groups[path] = _concat_tucker(path, contribs, dtype, report) if tucker == {True} else \
            _concat_plain(path, contribs, dtype, report)
    return groups


def _scaled(c: Contribution) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """Flat fp32 (up, down), Tucker mid, and cᵢ = strength·α/r of one contribution (DyLoRA ``dyn`` applied)."""
    up, down, mid = c.adapter._factors(c.dyn)  # type: ignore[attr-defined]
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), mid, c.strength * c.adapter.scale()


def _concat_plain(path: str, contribs: Sequence[Contribution], dtype: torch.dtype, report: ToolReport) \
        -> dict[str, Tensor]:
    ups, downs, ref_ups, ref_downs = [], [], [], []
    for c in contribs:
        up, down, _, coef = _scaled(c)
        root = math.sqrt(abs(coef))
        ups.append((up * (math.copysign(root, coef))).to(dtype))
        downs.append((down * root).to(dtype))
        ref_ups.append(up.double() * coef)
        ref_downs.append(down.double())
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    err2, norm2 = factor_error2(torch.cat(ref_ups, 1), torch.cat(ref_downs, 0), up, down)
    shape = _lora_shape(contribs[0])
    report.add(LayerResult(path, "+".join(c.kind for c in contribs), up.shape[1], norm2, err2))
    return lora_leaves(up, down, up.shape[1], shape)


def _concat_tucker(path: str, contribs: Sequence[Contribution], dtype: torch.dtype, report: ToolReport) \
        -> dict[str, Tensor]:
    parts = [_scaled(c) for c in contribs]
    ranks = [p[0].shape[1] for p in parts]
    total = sum(ranks)
    mid = torch.zeros(total, total, *parts[0][2].shape[2:])  # type: ignore[union-attr]
    ups, downs, o = [], [], 0
    exact = torch.zeros(0)
    for (up, down, m, coef), r in zip(parts, ranks):
        root = math.sqrt(abs(coef))
        ups.append(up * math.copysign(root, coef))
        downs.append(down * root)
        mid[o:o + r, o:o + r] = m  # type: ignore[assignment]
        o += r
        d = tucker_delta(up.double(), down.double(), m.double(), _lora_shape(contribs[0])) * coef  # type: ignore[union-attr]
        exact = d if exact.numel() == 0 else exact + d
    up, down, mid = torch.cat(ups, 1).to(dtype), torch.cat(downs, 0).to(dtype), mid.to(dtype)
    shape = _lora_shape(contribs[0])
    got = tucker_delta(up.double(), down.double(), mid.double(), shape)
    report.add(LayerResult(path, "+".join(c.kind for c in contribs), total, float(exact.pow(2).sum()),
                           float((exact - got).pow(2).sum())))
    out_f, _ = flat(shape)
    return {"lora_up.weight": up.reshape(out_f, total, 1, 1).contiguous(),
            "lora_down.weight": down.reshape(total, -1, 1, 1).contiguous(), "lora_mid.weight": mid.contiguous(),
            "alpha": torch.tensor(float(total), dtype=dtype)}


def _lora_shape(c: Contribution) -> tuple[int, ...]:
    from .layers import adapter_shape

    shape = adapter_shape(c.adapter)
    assert shape is not None  # LoRA/LoCon factors always fix the weight shape
    return shape


# -- svd -------------------------------------------------------------------------------------------------------

def _svd_all(layers: dict[str, list[Contribution]], arch: str, opts: MergeOptions, base: ModelFile | None,
             dtype: torch.dtype, report: ToolReport) -> Groups:
    from .output import bar

    if base is not None and Arch.UNKNOWN not in (arch, base.arch) and arch != base.arch:
        raise ToolError(f"{opts.base} is {base.arch}, the LoRAs are {arch}: give the base model they were made for")

    def known(path: str) -> tuple[int, ...] | None:
        assert base is not None
        return base.shape(path + ".weight") if path + ".weight" in base.params else None

    rule = opts.rule or _lossless_rule(layers, opts.conv_rank)
    report.notes.append(f"rank rule: {rule.describe()}")
    device = torch.device(opts.device)
    groups: Groups = {}
    for path, contribs in bar(sorted(layers.items()), desc="svd merge", total=len(layers)):
        contribs = bind_parts(contribs, base)  # FLUX.1 parts whose change reads the whole fused weight
        if all(isinstance(c.adapter, Norm) for c in contribs):
            groups[path] = _sum_norms(path, contribs, dtype, report)
            continue
        weight = base.values(path + ".weight") if base is not None and \
            any(c.adapter.needs_weight for c in contribs) and path + ".weight" in base.params else None
        shape = layer_shape(path, contribs, known if base is not None else None, arch)
        leaves = _svd_layer(path, contribs, shape, weight, rule, dtype, device, report)
        if leaves:
            groups[path] = leaves
    return groups


def _lossless_rule(layers: dict[str, list[Contribution]], conv_rank: int | None) -> RankRule:
    """Without a rule: the sum of the input ranks, lossless when every input is low-rank; refused otherwise."""
    if any(c.kind not in LOW_RANK_KINDS for cs in layers.values() for c in cs):
        raise ToolError("an svd merge of LoHa/LoKr/full/DoRA/… layers needs a rank rule: --rank R or --sv-fro F "
                        "(or --sv-ratio / --sv-cumulative)")
    top = max(sum(c.adapter.rank or 0 for c in cs) for cs in layers.values())
    return RankRule("rank", max(top, 1), conv_rank=conv_rank)


def _svd_layer(path: str, contribs: Sequence[Contribution], shape: tuple[int, ...], weight: Tensor | None,
               rule: RankRule, dtype: torch.dtype, device: torch.device, report: ToolReport) -> dict[str, Tensor]:
    layer_rule = rule.for_layer(is_conv_kernel(shape))
    kinds = "+".join(c.kind for c in contribs)
    note = _fixed_note(contribs)
    if layer_rule is None:
        report.leave_out(path, "k×k convolution and --conv-rank 0")
        return {}
    factors = [c.adapter.low_rank(c.dyn) for c in contribs]
    if all(f is not None for f in factors) and not any(c.adapter.needs_weight for c in contribs):
        ref_up = torch.cat([f[0].double() * (c.strength * f[2]) for f, c in zip(factors, contribs)], 1)  # type: ignore[index]
        ref_down = torch.cat([f[1].double() for f in factors], 0)  # type: ignore[index]
        dec = factored_svd(ref_up, ref_down)
        k = choose_rank(dec.s, layer_rule)
        up, down = dec.split(k, dtype) if k else (ref_up[:, :0].to(dtype), ref_down[:0].to(dtype))
        err2, norm2 = factor_error2(ref_up, ref_down, up, down)
    else:
        m = dense_delta(path, contribs, shape, weight, device).reshape(flat(shape))
        dec = dense_svd(m, layer_rule)
        k = choose_rank(dec.s, layer_rule, dec.total2)
        up, down = dec.split(k, dtype) if k else (m[:, :0].to(dtype), m[:0].to(dtype))
        err2, norm2 = dense_error2(m, up, down), dec.total2
    if k == 0:
        report.leave_out(path, "ΔW is zero at these weights")
        return {}
    report.add(LayerResult(path, kinds, k, norm2, err2, note))
    return lora_leaves(up.cpu(), down.cpu(), k, shape)


def _fixed_note(contribs: Sequence[Contribution]) -> str:
    fixed = [f"{c.kind} at {c.strength:g}" for c in contribs if c.adapter.needs_weight]
    return f"baked for the base weight: {', '.join(fixed)} (not linear in the weight)" if fixed else ""


def _sum_norms(path: str, contribs: Sequence[Contribution], dtype: torch.dtype, report: ToolReport) \
        -> dict[str, Tensor]:
    """Norm layers are tiny: their weighted sum is written exactly (``w_norm``/``b_norm``)."""
    out: dict[str, Tensor] = {}
    norm2 = err2 = 0.0
    for key in ("w_norm", "b_norm"):
        parts = [c.adapter.t[key].double() * c.strength for c in contribs if key in c.adapter.t]
        if parts:
            exact = torch.stack(parts).sum(0)
            out[key] = exact.to(dtype)
            norm2 += float(exact.pow(2).sum())
            err2 += float((exact - out[key].double()).pow(2).sum())
    report.add(LayerResult(path, "norm", None, norm2, err2))
    return out
