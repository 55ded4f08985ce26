"""``bake``: LoRAs fused into a base model, written in the model's own form (diffusers folder or single file) and
dtypes, every other tensor and file copied unchanged.

Each changed parameter is computed by the same ``Patcher`` that ``apply_loras`` uses, on a stand-in model that
holds only that layer (its tensors read from the file in their own dtype, the model's config for the
architecture checks), so the baked weights are bit-identical to what ``apply_loras`` fuses into the loaded model —
one layer (a fused layer's parts) in memory at a time. All checks (architecture, shapes, weight specs) run on the
whole set first.

A quantized base (fp8, ComfyUI scaled fp8, GGUF): a changed layer is written in bf16 — ``round_bf16(fp32(dq(Wq)) +
ΣΔW)``, the weight ``apply_loras`` computes per forward on that base in bf16 — and its scale/marker tensors are
dropped; every unchanged tensor keeps its stored bytes, except GGUF blocks, which safetensors cannot hold: they are
written as their bf16 dequantization. Requantizing would erase part of the LoRA (§ quantized bases in
docs/formats.md), so bake does not unless asked: ``--requant`` (GGUF bases, ``gguf_bake.py``) writes a GGUF of the
base's types with each layer's loss reported. The report says which layers changed dtype and the sizes.
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
from .gguf_bake import check_requant, requantized, write_requantized
from .gguf_modelfile import GgufFile
from .quant_bake import DENSE, patched, quantized_leaf, stand_in
from .report import LayerResult, ToolReport
from .sources import Source, load_sources
from .svd import diff_dot

Tensor = torch.Tensor
KEEP = 4  # patched modules held by the baker: the most parts a fused layer has (FLUX.1's linear1: q, k, v, MLP)


@dataclass
class BakeOptions:
    configs: Mapping[str, Mapping[str, Any]] | None = None  # single files of non-default configs
    dry_run: bool = False
    requant: bool = False  # a GGUF base: write a GGUF of its types (lossy, the error reported), not bf16 safetensors


def bake(model: str | Path, inputs: Sequence[str | Source], output: str | Path | None,
         options: BakeOptions | None = None) -> ToolReport:
    opts = options or BakeOptions()
    mf = open_model(model, opts.configs)
    sources = [s for s in inputs if isinstance(s, Source)] + load_sources([s for s in inputs if isinstance(s, str)])
    out = Path(output) if output is not None else None
    _check_output(mf, out, opts, [s.path for s in sources])
    pairs = [(s.lora, s.weight) for s in sources]
    report = ToolReport("bake", None if opts.dry_run else (str(out) if out else None))
    touched = _check(mf, pairs, report)
    _notes(mf, touched, opts, report)
    baker = _Baker(mf, pairs, touched, report)
    if opts.requant:
        check_requant(mf, touched)  # a K-quant layer to change: refused before anything is computed
    if out is None or opts.dry_run:
        for module in bar(sorted(touched), desc="baking", total=len(touched)):
            requantized(baker, module) if opts.requant else baker.module(module)
        return report
    meta = {"lorakit.tool": "bake", "lorakit.sources": json.dumps([s.describe() for s in sources])}
    if opts.requant:
        write_requantized(out, mf, baker, meta)
    elif mf.form == "single":
        write_safetensors(out, baker.entries(mf.files[0]), {**mf.files[0].header.metadata, **meta}, desc="baking")
    else:
        _write_folder(mf, out, baker, meta)
    report.size_bytes = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    return report


def _check_output(mf: ModelFile, out: Path | None, opts: BakeOptions, loras: list[Path]) -> None:
    """Before any work: ``--requant`` takes a GGUF base and writes ``.gguf``; a single file is baked into a
    ``.safetensors`` file (else no tool could open what it wrote); the output replaces no input."""
    gguf = isinstance(mf.files[0], GgufFile)
    if opts.requant and not gguf:
        raise ToolError(f"{mf.path}: --requant writes a GGUF of the base's own quantization types; this base is "
                        "no GGUF file (an fp8 base is baked exactly, its changed layers in bf16)")
    if out is None:
        return
    suffix = ".gguf" if opts.requant else ".safetensors"
    if mf.form == "single" and out.suffix.lower() != suffix:
        what = "--requant writes a GGUF file" if opts.requant else "a single-file model is baked into a single file"
        raise ToolError(f"{out}: {what}: name it NAME{suffix}")
    check_output(out, [mf.path, *loras], folder=mf.form == "folder")


def _notes(mf: ModelFile, touched: set[str], opts: BakeOptions, report: ToolReport) -> None:
    """What a quantized base's output holds, in the report."""
    refs = [ref for p in touched if (ref := mf.params.get(f"{p}.weight")) is not None and ref.quantized]
    kinds = ", ".join(sorted({ref.file.stored(ref.key) for ref in refs}))
    if refs or isinstance(mf.files[0], GgufFile):
        report.size_before = sum(f.path.stat().st_size for f in mf.files)
    if opts.requant:
        report.notes.append(f"{len(refs)} changed quantized layers ({kinds}) requantized to their own types (lossy: "
                            "each layer's share of ΔW kept and relative error reported); every other tensor copied "
                            "as stored")
    elif refs:
        report.notes.append(f"{len(refs)} changed quantized layers ({kinds}) written in bf16 (exact: the weights "
                            "apply_loras computes on this base in bf16)" +
                            ("" if isinstance(mf.files[0], GgufFile) else "; the other quantized tensors are kept as "
                             "stored"))
    gguf = [k for tf in mf.files for k in tf.header.tensors if not tf.holds(k)]
    if gguf and not opts.requant:
        report.notes.append(f"safetensors cannot hold GGUF blocks: the {len(gguf)} quantized tensors are written "
                            "dequantized in bf16 (the values a base loaded in bf16 computes with), F32/F16 tensors "
                            "as stored; --requant writes a GGUF of the base's types instead")


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
            setattr(leaf, name, stand_in(tensors[key], mf.params[key]) if tensors is not None else
                    torch.nn.Parameter(torch.empty(mf.shape(key), dtype=mf.params[key].dtype, device=device),
                                       requires_grad=False))
        if tensors is not None:  # a quantized weight: the loader's layer, merged per forward as on the loaded base
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
    """Computes the patched tensors of one module at a time (the last ``KEEP`` cached: a fused tensor's parts, until
    both its weight and bias are taken)."""

    def __init__(self, mf: ModelFile, pairs: list[tuple[LoraModel, Weight]], touched: set[str],
                 report: ToolReport) -> None:
        self.mf, self.pairs, self.touched, self.report = mf, pairs, touched, report
        self._cache: dict[str, dict[str, Tensor]] = {}
        self.results: dict[str, LayerResult] = {}  # module → its report line (a module computed again: not twice)

    def module(self, path: str) -> dict[str, Tensor]:
        """The patched tensors of ``path``; the last ``KEEP`` modules are held (the parts of one fused layer, so its
        weight and bias keys compute each part once)."""
        if path not in self._cache:
            if len(self._cache) >= KEEP:
                del self._cache[next(iter(self._cache))]
            self._cache[path] = self._patch(path)
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
        bias = getattr(leaf, "bias", None)
        bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        patcher.set(subset, log_reports=False)
        out = patched(leaf, {n.rsplit(".", 1)[1]: self.mf.params[n].dtype for n in names}, bias)
        patcher.restore()
        bad = [n for n, t in out.items() if not all_finite(t)]
        if bad:
            raise ToolError(f"layer {path}: the baked {bad[0]} holds NaN or infinite values (a LoRA weight too large "
                            f"for {out[bad[0]].dtype}?); nothing was written")
        after = out["weight"]
        d2 = diff_dot(after, before, after, before)
        ref = self.mf.params[f"{path}.weight"]
        note = f"; written {DENSE} (was {ref.file.stored(ref.key)})" if ref.quantized else ""
        if path not in self.results:
            self.results[path] = LayerResult(path, "+".join(sorted({kind_of(lora.layers[path]) for lora, _ in subset})),
                                             None, d2, 0.0, f"changed by ‖ΔW‖ {d2 ** 0.5:.3g}{note}")
            self.report.add(self.results[path])
        return out

    def entries(self, tf: TensorFile) -> list[Entry]:
        out = []
        dropped = self._dropped(tf)
        for key, info in tf.header.tensors.items():
            if key in dropped:
                continue
            refs = tf.refs.get(key, [])
            ref = Ref(tf, key)
            changed = any(c.rsplit(".", 1)[0] in self.touched for c, _ in refs)
            dtype = DENSE if (changed and ref.quantized) or not tf.holds(key) else ref.dtype
            out.append(Entry(key, dtype, tuple(info.shape), self._getter(tf, key, dtype, refs if changed else None)))
        return out

    def _dropped(self, tf: TensorFile) -> set[str]:
        """The scale and fp8-marker tensors of the fp8 weights this bake rewrites in bf16."""
        out: set[str] = set()
        for key, refs in tf.refs.items():
            if Ref(tf, key).dtype in FP8 and any(c.rsplit(".", 1)[0] in self.touched for c, _ in refs):
                layer = key.removesuffix(".weight")
                out |= {f"{layer}.{leaf}" for leaf in (*SCALE_KEYS, *IGNORED)}
        return out

    def _getter(self, tf: TensorFile, key: str, dtype: torch.dtype, refs: list[tuple[str, Ref]] | None) \
            -> Callable[[], Tensor]:
        """How to get one file tensor: as stored, dequantized (GGUF blocks, which safetensors cannot hold), or
        rebuilt from its patched parts (a GGUF file's changed F32 tensor: the bf16 result, exactly, in F32)."""
        if refs is None:
            return (lambda: tf.read(key)) if tf.holds(key) else lambda: Ref(tf, key).values(DENSE)
        return lambda: self._assemble(tf, key, refs).to(dtype)

    def _assemble(self, tf: TensorFile, key: str, refs: list[tuple[str, Ref]]) -> Tensor:
        """The file tensor from its canonical parts, patched where a LoRA changed them (q/k/v of a fused
        ``in_proj`` are concatenated back; OpenCLIP's ``text_projection`` transposed back)."""
        parts, rows = [], []
        for canonical, ref in sorted(refs, key=lambda cr: cr[1].part or (0, 1)):
            module, _, leaf = canonical.rpartition(".")
            t = self.module(module).get(leaf) if module in self.touched else None  # None: a bias no LoRA changed
            if t is None:  # a part of a rewritten quantized tensor, or a bias kept as stored
                t = ref.values(DENSE) if ref.quantized else ref.load()
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
