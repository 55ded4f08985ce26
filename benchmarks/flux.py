"""FLUX.1 at full width (hidden 3072, MLP 12288) with fewer blocks (default 2 double + 4 single, fp32, random
weights, CPU): apply, switch A→B and restore of rank-16 kohya files in BFL layout (fused qkv/linear1, embedders and
final layer included) and of a LoKr, side by side with diffusers' load + fuse / unfuse + unload on the same kohya file
(diffusers has no LoKr path; its kohya converter works at width 3072 and skips the blocks a file lacks), against
this CPU's compute bound (the larger of the copy floor — copying exactly the touched weights — and the type's own
arithmetic done once over them: one fp32 ``addmm`` pass W + up@down for LoRA, a ``kron`` at each fused shape plus
W + ΔW for the full-factor LoKr) and extrapolated to FLUX.1's 19 + 38 blocks by the per-block costs.

Run with nothing else busy:  python benchmarks/flux.py [--double 2 --single 4 --rank 16]
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import best_of, diffusers_cycle, switch_peak_gib, timed

import lorakit
from lorakit.files.io import save_file
from lorakit.models.flux_configs import variant_config
from tests.factories import adapter_tensors
from tests.flux_factories import bfl_table, fused_weight, kohya_keys

DOUBLE_MODULES = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                  "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin")


def build(double: int, single: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    cfg = dict(variant_config("flux-1-dev"), num_layers=double, num_single_layers=single)
    torch.manual_seed(0)
    with torch.device(device):
        return FluxTransformer2DModel(**cfg).to(dtype).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_file(tr: torch.nn.Module, kind: str, rank: int, seed: int, double: int, single: int) -> dict[str, torch.Tensor]:
    """A kohya file in BFL names over every block layer, the embedders and the final layer."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for bfl, (parts, swap) in bfl_table(double, single).items():
        shape = tuple(fused_weight(tr, parts, swap).shape)
        layers[bfl] = {k: v.to(torch.bfloat16) if v.is_floating_point() and v.dim() else v
                       for k, v in adapter_tensors(kind, shape, rank, gen, alpha=rank / 2).items()}
    return kohya_keys(layers)


def floor_seconds(params: list[torch.Tensor]) -> float:
    """Copying exactly the touched weights into preallocated buffers: the memory-bandwidth floor of a switch."""
    buffers = [torch.empty_like(p) for p in params]

    def run() -> None:
        for b, p in zip(buffers, params):
            b.copy_(p)
        sync(params[0].device)

    t = best_of(3, run)
    buffers.clear()
    return t


def addmm_seconds(params: list[torch.Tensor], rank: int) -> float:
    """One ``W + up@down`` pass over the touched weights into preallocated buffers, in the weights' dtype (a
    rank-``rank`` switch's arithmetic: it cannot do less)."""
    like = params[0]
    factors = [(torch.randn(p.shape[0], rank, device=like.device, dtype=like.dtype),
                torch.randn(rank, p.shape[1], device=like.device, dtype=like.dtype)) for p in params]
    outs = [torch.empty_like(p) for p in params]

    def run() -> None:
        for p, out, (up, down) in zip(params, outs, factors):
            torch.addmm(p, up, down, alpha=0.5, out=out)
        sync(like.device)

    t = best_of(3, run)
    outs.clear()
    return t


def kron_seconds(tr: torch.nn.Module, file: dict[str, torch.Tensor], double: int, single: int) -> tuple[float, float]:
    """A full-factor LoKr's own arithmetic, done once: per BFL layer ``kron(w1, w2)`` at the fused shape (the change
    is defined on the fused weight) and ``W + ΔW`` of each part's rows into preallocated buffers, in the weights'
    dtype. The LoKr switch cannot do less than this; ``addmm_seconds`` (a rank-r product) is no bound for it. Second:
    the same with the scale as its own pass, ``kron(w1, w2)·s`` then ``W + ΔW`` — LyCORIS's order (lorakit's
    ``functional.lokr_delta`` scales the smaller factor before the kron instead, saving that pass)."""
    work = []
    for bfl, (parts, _swap) in bfl_table(double, single).items():
        stem = "lora_unet_" + bfl.replace(".", "_")
        weights = [tr.get_submodule(p).weight for p in parts]
        w1, w2 = (file[f"{stem}.lokr_w{i}"].to(weights[0]) for i in (1, 2))
        work.append((w1, w2, weights, [torch.empty_like(w) for w in weights]))

    def run(scaled: bool) -> None:
        for w1, w2, weights, outs in work:
            delta = torch.kron(w1, w2)
            if scaled:
                delta.mul_(0.5)
            row = 0
            for w, out in zip(weights, outs):
                torch.add(w, delta[row:row + w.shape[0]], alpha=1.0 if scaled else 0.5, out=out)
                row += w.shape[0]
        sync(weights[0].device)

    return best_of(3, lambda: run(False)), best_of(3, lambda: run(True))


def lorakit_phase(tr: torch.nn.Module, a: Path, b: Path) -> dict[str, float]:
    r: dict[str, float] = {}
    comps = {"transformer": tr}
    la, lb = lorakit.load_lora(a), lorakit.load_lora(b)
    patcher = lorakit.patcher_for(comps)
    gc.collect()
    device = next(tr.parameters()).device
    with timed(r, "apply_A_cold"):
        patcher.set([(la, 1.0)])
        sync(device)
    switches = []
    for target in (lb, la, lb):
        t = time.perf_counter()
        patcher.set([(target, 1.0)])
        sync(device)
        switches.append(time.perf_counter() - t)
    r["switch_best_of_3"], r["switch_median_of_3"] = min(switches), sorted(switches)[1]
    with timed(r, "restore"):
        patcher.restore()
        sync(device)
    r["peak_rss_over_model_gib"] = switch_peak_gib(patcher, la, lb)
    return r


def diffusers_phase(tr: torch.nn.Module, a: Path) -> dict[str, float]:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)
    return diffusers_cycle(pipe, a)


def run_kind(tr: torch.nn.Module, kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    files, made = [], []
    for i in range(2):
        path = tmp / f"{kind}_{i}.safetensors"
        made.append(make_file(tr, kind, args.rank, i, args.double, args.single))
        save_file(made[-1], path)
        files.append(path)
    lora = lorakit.load_lora(files[0])
    touched = [lorakit.patch.targets.find_module({"transformer": tr}, p).weight for p in lora.layers]  # type: ignore[union-attr]
    r = {"touched_gib": sum(p.numel() * p.element_size() for p in touched) / 2 ** 30, "layers": float(len(lora.layers)),
         "floor_copy_touched": floor_seconds(touched), "addmm_pass_touched": addmm_seconds(touched, args.rank)}
    if kind == "lokr":  # its own arithmetic bound (a kron at the fused shape), not a rank-r product's
        r["kron_pass_touched"], r["kron_scale_pass_touched"] = kron_seconds(tr, made[0], args.double, args.single)
    made.clear()
    r.update(lorakit_phase(tr, *files))
    if kind == "lora" and not args.skip_diffusers:
        r.update(diffusers_phase(tr, files[0]))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tr = build(args.double, args.single, args.device, dtype)
    params = sum(p.numel() for p in tr.parameters())
    print(f"built FLUX.1 width 3072, {args.double}+{args.single} blocks, {params / 1e9:.2f} B params ({args.dtype}, "
          f"{args.device}) in "
          f"{time.perf_counter() - t0:.1f} s")
    tmp = Path(tempfile.mkdtemp())
    results = {kind: run_kind(tr, kind, args, tmp) for kind in ("lora", "lokr")}
    report(results, args)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(json.dumps({k: {n: round(v, 3) for n, v in r.items()} for k, r in results.items()}, indent=1))
    blocks = (19 + 38) / (args.double + args.single)
    for kind, r in results.items():
        bound = max(r["floor_copy_touched"], r.get("kron_pass_touched", r["addmm_pass_touched"]))
        switch = r["switch_best_of_3"]
        print(f"\n[{kind}] {int(r['layers'])} layers, touched {r['touched_gib']:.2f} GiB")
        print(f"  switch A→B {switch:.3f} s = {switch / bound:.2f}× the compute bound (target ≤ 1.15×), "
              f"{switch / r['floor_copy_touched']:.2f}× the copy floor; median {r['switch_median_of_3'] / bound:.2f}×")
        if "kron_scale_pass_touched" in r:
            print(f"  vs kron, scale and add as separate passes (LyCORIS's order; lorakit scales the smaller factor): "
                  f"{switch / max(r['floor_copy_touched'], r['kron_scale_pass_touched']):.2f}×")
        print(f"  cold apply {r['apply_A_cold']:.3f} s, restore {r['restore'] * 1000:.1f} ms; peak RSS over the model "
              f"{r['peak_rss_over_model_gib']:.2f} GiB ({r['peak_rss_over_model_gib'] / r['touched_gib']:.2f}× touched)")
        print(f"  extrapolated to 19+38 blocks (×{blocks:.1f} the block layers): switch ≈ {switch * blocks:.1f} s, "
              f"cold apply ≈ {r['apply_A_cold'] * blocks:.1f} s")
        if "diffusers_fuse" in r:
            d_apply = r["diffusers_load"] + r["diffusers_fuse"]
            d_switch = d_apply + r["diffusers_unfuse"] + r["diffusers_unload"]
            print(f"  diffusers load+fuse {d_apply:.2f} s ({d_apply / r['apply_A_cold']:.1f}× lorakit's cold apply); "
                  f"a switch (unfuse+unload+load+fuse) {d_switch:.2f} s = {d_switch / switch:.1f}× lorakit's")


if __name__ == "__main__":
    main()
