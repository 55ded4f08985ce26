"""``bake``: LoRAs fused into a base model, written in the model's own form (diffusers folder or single file) and
dtypes, every other tensor and file copied unchanged.

Each changed parameter is computed by the same ``Patcher`` that ``apply_loras`` uses, on a stand-in model that
holds only that layer (its tensors read from the file in their own dtype, the model's config for the
architecture checks), so the baked weights are bit-identical to what ``apply_loras`` fuses into the loaded model —
one layer in memory at a time. All checks (architecture, shapes, weight specs) run on the whole set first.

A quantized base (fp8, ComfyUI scaled fp8): a changed layer is written in bf16 — ``round_bf16(fp32(dq(Wq)) + ΣΔW)``,
the weight ``apply_loras`` computes per forward on that base in bf16 — and its scale/marker tensors are dropped;
every unchanged tensor keeps its stored bytes. Requantizing instead would erase part of the LoRA (§ quantized bases
in docs/formats.md), so bake does not; the report says which layers changed dtype and the size it costs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..adapters import kind_of
from ..errors import ToolError
from ..files.output import atomic_dir
from ..keymap.families import family_of_arch
from ..lora_model import LoraModel, all_finite
from ..patch import Patcher
from ..patch.plan import build_plan
from ..patch.weights import Weight
from ..quant.files import IGNORED, SCALE_KEYS
from ..quant.layers import FP8, weight_values
from .flux_bake import fused_siblings, scatter_rows
from .modelfile import ModelFile, Ref, TensorFile, open_model
from .output import Entry, bar, check_output, write_safetensors
from .quant_bake import DENSE, patched, quantized_leaf
from .report import LayerResult, ToolReport
from .sources import Source, load_sources

Tensor = torch.Tensor


@dataclass
class BakeOptions:
    configs: Mapping[str, Mapping[str, Any]] | None = None  # single files of non-default configs
    dry_run: bool = False


def bake(model: str | Path, inputs: Sequence[str | Source], output: str | Path | None,
         options: BakeOptions | None = None) -> ToolReport:
    opts = options or BakeOptions()
    mf = open_model(model, opts.configs)
    sources = [s for s in inputs if isinstance(s, Source)] + load_sources([s for s in inputs if isinstance(s, str)])
    out = Path(output) if output is not None else None
    if out is not None:
        if mf.form == "single" and out.suffix.lower() != ".safetensors":  # else no tool could open what it wrote
            raise ToolError(f"{out}: a single-file model is baked into a single file: name it NAME.safetensors")
        check_output(out, [mf.path] + [s.path for s in sources], folder=mf.form == "folder")
    pairs = [(s.lora, s.weight) for s in sources]
    report = ToolReport("bake", None if opts.dry_run else (str(out) if out else None))
    touched = _check(mf, pairs, report)
    rewritten = sorted(p for p in touched if (ref := mf.params.get(f"{p}.weight")) is not None and ref.quantized)
    if rewritten:
        report.notes.append(f"{len(rewritten)} changed fp8 layers written in bf16 (exact: the weights apply_loras "
                            "computes on this base in bf16); the other quantized tensors are kept as stored")
        report.size_before = sum(f.path.stat().st_size for f in mf.files)
    baker = _Baker(mf, pairs, touched, report)
    if out is None or opts.dry_run:
        for module in bar(sorted(touched), desc="baking", total=len(touched)):
            baker.module(module)
        return report
    meta = {"lorakit.tool": "bake", "lorakit.sources": json.dumps([s.describe() for s in sources])}
    if mf.form == "single":
        write_safetensors(out, baker.entries(mf.files[0]), {**mf.files[0].header.metadata, **meta}, desc="baking")
    else:
        _write_folder(mf, out, baker, meta)
    report.size_bytes = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    return report


def _skeleton(mf: ModelFile, shapes: Mapping[str, tuple[int, ...]], device: str = "meta",
              tensors: Mapping[str, Tensor] | None = None) -> dict[str, torch.nn.Module]:
    """A stand-in model: one root per component carrying its config (so the architecture reads as the loaded
    model's), and a Linear/Conv2d/LayerNorm at each canonical path with the given weights (or meta tensors)."""
    roots: dict[str, torch.nn.Module] = {}
    for component, cfg in mf.config.items():
        roots[component] = torch.nn.Module()
        roots[component].config = SimpleNamespace(**cfg)  # type: ignore[assignment]
        if family_of_arch(mf.arch).denoiser != "unet":  # a DiT family's model is told by its classes, which a
            # stand-in lacks (SD3's size is its arch too)
            roots[component].lorakit_arch = mf.arch  # type: ignore[assignment]
    for path, shape in shapes.items():
        component, _, rest = path.partition(".")
        leaf = _leaf_module(shape, f"{path}.bias" in mf.params)
        for name in ("weight", "bias"):
            if getattr(leaf, name, None) is None:
                continue
            key = f"{path}.{name}"
            t = tensors[key] if tensors is not None else torch.empty(mf.shape(key), dtype=mf.params[key].dtype,
                                                                     device=device)
            setattr(leaf, name, torch.nn.Parameter(t, requires_grad=False))
        if tensors is not None:  # an fp8 weight: lorakit's fp8 layer, merged per forward as on the loaded base
            leaf = quantized_leaf(leaf, mf.params[f"{path}.weight"])
        _attach(roots[component], rest, leaf)
    return roots


def _leaf_module(shape: tuple[int, ...], bias: bool) -> torch.nn.Module:
    with torch.device("meta"):
        if len(shape) == 2:
            return torch.nn.Linear(shape[1], shape[0], bias=bias)
        if len(shape) == 4:
            return torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=bias)  # type: ignore[arg-type]
        return torch.nn.LayerNorm(shape[0], elementwise_affine=True, bias=bias)


def _attach(root: torch.nn.Module, path: str, leaf: torch.nn.Module) -> None:
    *parents, last = path.split(".")
    node = root
    for name in parents:
        if not hasattr(node, name):
            node.add_module(name, torch.nn.Module())
        node = getattr(node, name)
    node.add_module(last, leaf)


def _check(mf: ModelFile, pairs: list[tuple[LoraModel, Weight]], report: ToolReport) -> set[str]:
    """Run ``apply_loras``' checks on the whole set (meta tensors); the modules that will change."""
    modules = mf.modules()
    wanted = {p: modules[p] for lora, _ in pairs for p in lora.layers if p in modules}
    plan = build_plan(_skeleton(mf, wanted), pairs)
    for r in plan.reports:
        for path in r.unmatched:
            report.leave_out(path, f"{r.name}: no such layer in the model")
    return set(plan.layers)


class _Baker:
    """Computes the patched tensors of one module at a time (cached until both weight and bias are taken)."""

    def __init__(self, mf: ModelFile, pairs: list[tuple[LoraModel, Weight]], touched: set[str],
                 report: ToolReport) -> None:
        self.mf, self.pairs, self.touched, self.report = mf, pairs, touched, report
        self._cache: dict[str, dict[str, Tensor]] = {}

    def module(self, path: str) -> dict[str, Tensor]:
        if path not in self._cache:
            self._cache = {path: self._patch(path)}  # one module held at a time
        return self._cache[path]

    def _patch(self, path: str) -> dict[str, Tensor]:
        names = [n for n in (f"{path}.weight", f"{path}.bias") if n in self.mf.params]
        tensors = {n: self.mf.load(n) for n in names}
        others = [p for p in fused_siblings(path, [lora for lora, _ in self.pairs])  # the rest of a fused layer
                  if f"{p}.weight" in self.mf.params]  # whose change reads its whole original weight
        tensors |= {n: self.mf.load(n) for p in others for n in (f"{p}.weight", f"{p}.bias") if n in self.mf.params}
        shapes = {p: self.mf.shape(f"{p}.weight") for p in (path, *others)}
        components = _skeleton(self.mf, shapes, tensors=tensors)
        subset = [(dataclasses.replace(lora, layers={path: lora.layers[path]}), w) for lora, w in self.pairs
                  if path in lora.layers]
        patcher = Patcher(components)
        leaf = components[path.split(".", 1)[0]].get_submodule(path.split(".", 1)[1])
        before = weight_values(leaf)  # an fp8 weight's values (dq), not its stored numbers
        patcher.set(subset, log_reports=False)
        out = patched(leaf, {n.rsplit(".", 1)[1]: self.mf.params[n].dtype for n in names})
        patcher.restore()
        bad = [n for n, t in out.items() if not all_finite(t)]
        if bad:
            raise ToolError(f"layer {path}: the baked {bad[0]} holds NaN or infinite values (a LoRA weight too large "
                            f"for {out[bad[0]].dtype}?); nothing was written")
        after = out["weight"]
        d2 = float((after.double() - before.double()).pow(2).sum())
        stored = self.mf.params[f"{path}.weight"].dtype
        note = f"; written {DENSE} (was {str(stored).removeprefix('torch.')})" if stored in FP8 else ""
        self.report.add(LayerResult(path, "+".join(sorted({kind_of(lora.layers[path]) for lora, _ in subset})), None,
                                    d2, 0.0, f"changed by ‖ΔW‖ {d2 ** 0.5:.3g}{note}"))
        return out

    def entries(self, tf: TensorFile) -> list[Entry]:
        out = []
        dropped = self._dropped(tf)
        for key, info in tf.header.tensors.items():
            if key in dropped:
                continue
            refs = tf.refs.get(key, [])
            dtype = Ref(tf, key).dtype
            changed = any(c.rsplit(".", 1)[0] in self.touched for c, _ in refs)
            if changed and dtype in FP8:
                dtype = DENSE
            out.append(Entry(key, dtype, tuple(info.shape), self._getter(tf, key, refs if changed else None)))
        return out

    def _dropped(self, tf: TensorFile) -> set[str]:
        """The scale and fp8-marker tensors of the fp8 weights this bake rewrites in bf16."""
        out: set[str] = set()
        for key, refs in tf.refs.items():
            if Ref(tf, key).dtype in FP8 and any(c.rsplit(".", 1)[0] in self.touched for c, _ in refs):
                layer = key.removesuffix(".weight")
                out |= {f"{layer}.{leaf}" for leaf in (*SCALE_KEYS, *IGNORED)}
        return out

    def _getter(self, tf: TensorFile, key: str, refs: list[tuple[str, Ref]] | None) -> Callable[[], Tensor]:
        """How to get one file tensor: as stored, or rebuilt from its patched parts."""
        if refs is None:
            return lambda: tf.read(key)
        return lambda: self._assemble(tf, key, refs)

    def _assemble(self, tf: TensorFile, key: str, refs: list[tuple[str, Ref]]) -> Tensor:
        """The file tensor from its canonical parts, patched where a LoRA changed them (q/k/v of a fused
        ``in_proj`` are concatenated back; OpenCLIP's ``text_projection`` transposed back)."""
        parts, rows = [], []
        for canonical, ref in sorted(refs, key=lambda cr: cr[1].part or (0, 1)):
            module, _, leaf = canonical.rpartition(".")
            t = self.module(module)[leaf] if module in self.touched else \
                ref.values(DENSE) if ref.quantized else ref.load()  # a part of a rewritten fp8 tensor
            parts.append(t.T.contiguous() if ref.transposed else t)
            rows.append(ref.rows)
        if rows[0]:  # FLUX.1's fused BFL layers: each part's rows back where the file has them
            return scatter_rows(list(zip(rows, parts)))  # type: ignore[arg-type]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _write_folder(mf: ModelFile, out: Path, baker: _Baker, meta: dict[str, str]) -> None:
    weights = {f.path: f for f in mf.files}
    with atomic_dir(out) as tmp:
        for src in sorted(mf.path.rglob("*")):
            dst = tmp / src.relative_to(mf.path)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            elif src in weights:
                tf = weights[src]
                write_safetensors(dst, baker.entries(tf), {**tf.header.metadata, **meta}, desc=f"baking {src.name}")
            elif src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            else:  # a FIFO would block the copy; a device would copy without end
                raise ToolError(f"{src}: not a regular file or folder, so the model folder cannot be copied")
