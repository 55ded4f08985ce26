"""The LoRA tools on full-size SD1.5 (UNet + CLIP-L, random weights, fp32), each beside a plain full-SVD loop.

- extract: BASE vs TUNED (every Linear/Conv weight changed by a rank-48 part with a decaying spectrum plus
  full-rank noise at 5 % of its energy), rank 32. lorakit reads layer by layer; the baseline loads both models
  whole (as kohya's ``extract_lora_from_models.py``) and runs ``torch.linalg.svd`` on every ΔW. Peak RSS of each
  against the two models' size, and the per-layer error of lorakit's SVD against the optimal one.
- resize: a rank-128 LoCon to rank 32: lorakit (QR of the factors + a 128×128 SVD) vs the dense ΔW and a full
  SVD per layer (kohya's ``resize_lora.py``).
- svd merge: two rank-64 LoCons at 0.7 / 0.5 to rank 32, likewise.
  Both LoCons cover every third Linear/Conv layer of the model (full SVDs of every layer take most of an hour per
  tool on two cores); both sides process exactly those layers.

Run with nothing else busy:  python benchmarks/tools.py [--only extract,resize,merge] [--threads 1] [--keep]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import time
from pathlib import Path

import torch
from _common import PeakRss, trim

from lorakit.models.configs import build_components
from lorakit.tools.merge import MergeOptions, merge
from lorakit.tools.output import entries_of, write_safetensors
from lorakit.tools.resize import ResizeOptions, resize
from lorakit.tools.svd import RankRule
from tests.factories import layer_paths

GiB = 2 ** 30


def save_folder(comps: dict[str, torch.nn.Module], folder: Path) -> int:
    """A diffusers-style folder (configs + safetensors), streamed; returns its tensor bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    total = 0
    for name, module in comps.items():
        (folder / name).mkdir(exist_ok=True)
        cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        (folder / name / "config.json").write_text(json.dumps(cfg, default=str))
        sd = {k: v.contiguous() for k, v in module.state_dict().items()}
        total += sum(t.numel() * t.element_size() for t in sd.values())
        write_safetensors(folder / name / ("diffusion_pytorch_model.safetensors" if name == "unet" else
                                           "model.safetensors"), entries_of(sd))
    return total


def tune(comps: dict[str, torch.nn.Module], gen: torch.Generator) -> None:
    """W += a rank-48 ΔW with σᵢ ∝ 0.9ⁱ (2 % of ‖W‖) + full-rank noise at 5 % of ΔW's energy."""
    with torch.no_grad():
        for module in layer_paths(comps).values():
            w = module.weight
            out, n = w.shape[0], w[0].numel()
            r = min(48, out, n)
            u = torch.linalg.qr(torch.randn(out, r, generator=gen)).Q
            v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
            s = 0.9 ** torch.arange(r, dtype=torch.float32)
            d = (u * s) @ v.T
            d += torch.randn(out, n, generator=gen) * (0.05 * float(d.norm()) / math.sqrt(out * n))
            w += (d * (0.02 * float(w.norm()) / float(d.norm()))).reshape(w.shape)


def make_models(root: Path) -> int:
    comps = {k: v.eval().requires_grad_(False) for k, v in build_components("sd1", device="cpu").items()}
    size = save_folder(comps, root / "base")
    tune(comps, torch.Generator().manual_seed(0))
    save_folder(comps, root / "tuned")
    del comps
    gc.collect()
    trim()
    return size


def baseline_extract(root: Path, rank: int) -> tuple[dict[str, float], float, int]:
    """kohya's way: both models whole in memory, full SVD of every ΔW; per-layer optimal errors."""
    from safetensors.torch import load_file

    errors: dict[str, float] = {}
    t = time.perf_counter()
    with PeakRss() as peak:
        for comp, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
            base, tuned = load_file(root / "base" / comp / fname), load_file(root / "tuned" / comp / fname)
            for key, wb in base.items():
                if not key.endswith(".weight") or wb.dim() not in (2, 4) or "embedding" in key:
                    continue
                diff = (tuned[key].float() - wb.float()).reshape(wb.shape[0], -1)
                if not diff.any():
                    continue
                s = torch.linalg.svd(diff, full_matrices=False).S.double()
                errors[f"{comp}.{key[:-len('.weight')]}"] = math.sqrt(float(s[rank:].pow(2).sum() /
                                                                              s.pow(2).sum()))
            del base, tuned
    return errors, time.perf_counter() - t, peak.peak_over


def run_extract(root: Path, size: int) -> dict[str, object]:
    from lorakit.tools.extract import ExtractOptions, extract

    t = time.perf_counter()
    with PeakRss() as peak:
        report = extract(root / "base", root / "tuned", root / "x.safetensors", ExtractOptions(RankRule("rank", 32)))
    ours_s, ours_peak = time.perf_counter() - t, peak.peak_over
    trim()
    optimal, base_s, base_peak = baseline_extract(root, 32)
    ours = {x.path: x.rel for x in report.layers if x.rank}
    ratio = max(ours[p] / optimal[p] for p in optimal if optimal[p] > 0 and p in ours)
    gap = max(ours[p] - optimal[p] for p in optimal if p in ours)
    methods = {m: sum(x.note == m for x in report.layers) for m in ("randomized", "full")}
    return {"models_gib": 2 * size / GiB, "layers": len(ours), "lorakit_s": ours_s, "baseline_s": base_s,
            "lorakit_peak_gib": ours_peak / GiB, "baseline_peak_gib": base_peak / GiB,
            "lorakit_error_over_optimal_max": ratio, "error_gap_max": gap, "methods": methods,
            "error": report.per_component()}


def lora_file(path: Path, rank: int, seed: int, step: int = 3) -> None:
    """A kohya LoCon on every ``step``-th Linear/Conv of SD1.5 with σᵢ ∝ 0.95ⁱ, α = rank/2."""
    from tests.factories import kohya_name

    comps = build_components("sd1")  # meta: shapes only
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for p, m in list(layer_paths(comps).items())[::step]:
        out, inp, *k = m.weight.shape
        r = min(rank, out, inp)
        s = (0.95 ** torch.arange(r, dtype=torch.float32)).sqrt()
        name = kohya_name(p)
        sd[f"{name}.lora_up.weight"] = (torch.randn(out, r, generator=gen) * s * 0.05).reshape(out, r, *[1] * len(k))
        sd[f"{name}.lora_down.weight"] = (torch.randn(r, inp, *k, generator=gen) * 0.05) * s.reshape(r, *[1] * (
            1 + len(k)))
        sd[f"{name}.alpha"] = torch.tensor(rank / 2)
    write_safetensors(path, entries_of(sd))


def dense_baseline(paths: list[tuple[Path, float]], rank: int) -> tuple[dict[str, float], float]:
    """kohya's resize / svd-merge: dense Σ wᵢ·scaleᵢ·upᵢ@downᵢ per layer, full SVD, keep ``rank``."""
    import lorakit

    loras = [(lorakit.load_lora(p), w) for p, w in paths]
    errors: dict[str, float] = {}
    t = time.perf_counter()
    for path in loras[0][0].layers:
        m = sum(w * lr[2] * (lr[0] @ lr[1]) for lora, w in loras if (lr := lora.layers[path].low_rank()))
        s = torch.linalg.svd(m, full_matrices=False).S.double()  # type: ignore[union-attr]
        errors[path] = math.sqrt(float(s[rank:].pow(2).sum() / s.pow(2).sum()))
    return errors, time.perf_counter() - t


def compare(name: str, run: object, paths: list[tuple[Path, float]]) -> dict[str, object]:
    t = time.perf_counter()
    report = run()  # type: ignore[operator]
    ours_s = time.perf_counter() - t
    optimal, base_s = dense_baseline(paths, 32)
    ours = {x.path: x.rel for x in report.layers}
    return {"layers": len(ours), "lorakit_s": ours_s, "baseline_s": base_s,
            "error_gap_max": max(ours[p] - optimal[p] for p in optimal)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="extract,resize,merge")
    ap.add_argument("--dir", default="/tmp/lorakit-bench-tools")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    ap.add_argument("--keep", action="store_true", help="reuse and keep the model folders in --dir")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"torch_threads": torch.get_num_threads()}
    try:
        if "extract" in args.only:
            have = (root / "tuned" / "unet" / "diffusion_pytorch_model.safetensors").is_file() and args.keep
            size = sum(f.stat().st_size for f in (root / "base").rglob("*.safetensors")) if have else \
                make_models(root)
            results["extract"] = run_extract(root, size)
        if "resize" in args.only:
            lora_file(root / "r128.safetensors", 128, 1)
            results["resize"] = compare("resize", lambda: resize(root / "r128.safetensors", root / "r32.safetensors",
                                                                 ResizeOptions(RankRule("rank", 32))),
                                        [(root / "r128.safetensors", 1.0)])
        if "merge" in args.only:
            lora_file(root / "a.safetensors", 64, 2)
            lora_file(root / "b.safetensors", 64, 3)
            opts = MergeOptions("svd", RankRule("rank", 32))
            results["merge"] = compare("merge", lambda: merge([f"{root / 'a.safetensors'}:0.7",
                                                               f"{root / 'b.safetensors'}:0.5"],
                                                              root / "m.safetensors", opts),
                                       [(root / "a.safetensors", 0.7), (root / "b.safetensors", 0.5)])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
