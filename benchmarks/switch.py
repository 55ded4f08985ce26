"""Switching LoRAs on a full-size SD1.5 UNet + CLIP-L (random weights), side by side with diffusers.

Two rank-32 kohya LoCon files (attention, feed-forward, resnet convolutions, up/down samplers, CLIP attention and
MLP). Measures, in one process: lorakit apply A, switch A→B, restore; the compute bound of a switch, the larger of
the copy floor (copying exactly the tensors that change, into preallocated buffers) and one ``addmm`` pass over
the touched weights (``W + up@down`` for each, fp32, into preallocated buffers: the arithmetic a rank-r switch
cannot avoid); diffusers ``load_lora_weights`` + ``fuse_lora`` and ``unfuse_lora`` + ``unload_lora_weights`` on the
same file; and lorakit's peak RSS over the model during apply/switch/restore.

Run with nothing else busy:  python benchmarks/switch.py [--dtype fp32|fp16] [--rank 32]
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
from lorakit.models.configs import build_components
from tests.factories import make_kohya_lora

UNET_TARGETS = ("attentions", "resnets", "downsamplers", "upsamplers")


def kohya_targets(path: str) -> str | None:
    """kohya LoCon's default reach: Transformer2D, ResnetBlock2D, Down/Upsample in the UNet; CLIP attn + MLP."""
    component, _, rest = path.partition(".")
    if component == "unet":
        return "lora" if any(f".{t}." in f".{rest}" for t in UNET_TARGETS) else None
    return "lora" if ".self_attn." in path or ".mlp." in path else None


def build(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    comps = build_components("sd1", device="cpu")
    return {k: v.to(dtype).eval().requires_grad_(False) for k, v in comps.items()}


def floor_seconds(params: list[torch.Tensor]) -> float:
    """Copying exactly the touched tensors into preallocated buffers: the memory-bandwidth floor of a switch."""
    buffers = [torch.empty_like(p) for p in params]

    def run() -> None:
        for b, p in zip(buffers, params):
            b.copy_(p)

    t = best_of(3, run)
    buffers.clear()
    return t


def addmm_seconds(params: list[torch.Tensor], lora: lorakit.LoraModel, paths: list[str]) -> float:
    """One fp32 ``addmm`` pass ``W + s·up@down`` over the touched weights, into preallocated buffers (fp32 weights
    are read in place; half-precision ones through an fp32 block of the same size, as lorakit sums in fp32)."""
    factors = []
    for path in paths:
        lr = lorakit.patch.placement.adapter_on(lora.layers[path], torch.device("cpu")).low_rank()
        if lr is None:
            raise SystemExit(f"{path}: not a low-rank layer; the addmm bound needs LoRA/LoCon files")
        factors.append(lr)
    biggest = max(p.numel() for p in params)
    scratch = torch.empty(biggest) if params[0].dtype != torch.float32 else None
    outs = [torch.empty(p.shape[0], p[0].numel()) for p in params]

    def run() -> None:
        for p, out, (up, down, scale) in zip(params, outs, factors):
            src = p.detach().view(p.shape[0], -1) if scratch is None else scratch[:p.numel()].view(p.shape[0], -1)
            torch.addmm(src, up, down, alpha=scale, out=out)

    t = best_of(3, run)
    outs.clear()
    return t


def lorakit_phase(comps: dict[str, torch.nn.Module], a: Path, b: Path) -> dict[str, float]:
    """Timings first (no sampler running), then a separate pass for peak memory."""
    r: dict[str, float] = {}
    la, lb = lorakit.load_lora(a), lorakit.load_lora(b)
    for lora in (la, lb):  # fault the LoRA tensors in now, so the RSS below counts only patching
        for adapter in lora.layers.values():
            for t in adapter.t.values():
                t.sum()
    patcher = lorakit.patcher_for(comps)
    gc.collect()
    with timed(r, "apply_A_cold"):
        patcher.set([(la, 1.0)])
    switches = []
    for target in (lb, la, lb):
        t = time.perf_counter()
        patcher.set([(target, 1.0)])
        switches.append(time.perf_counter() - t)
    r["switch_best_of_3"] = min(switches)
    r["switch_median_of_3"] = sorted(switches)[1]
    with timed(r, "reapply_same"):
        patcher.set([(lb, 1.0)])
    with timed(r, "restore"):
        patcher.restore()
    r["peak_rss_over_model_gib"] = switch_peak_gib(patcher, la, lb)
    return r


def diffusers_phase(comps: dict[str, torch.nn.Module], a: Path) -> dict[str, float]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=comps["text_encoder"], tokenizer=None, unet=comps["unet"],
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return diffusers_cycle(pipe, a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--skip-diffusers", action="store_true")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.float16
    torch.manual_seed(0)
    t0 = time.perf_counter()
    comps = build(dtype)
    print(f"built SD1.5 UNet + CLIP-L ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    tmp = Path(tempfile.mkdtemp())
    files = []
    for i, name in enumerate(("a", "b")):
        sd = make_kohya_lora(comps, kohya_targets, rank=args.rank, seed=i, alpha=args.rank / 2, dtype=torch.float16)
        save_file(sd, tmp / f"{name}.safetensors")
        files.append(tmp / f"{name}.safetensors")
    la = lorakit.load_lora(files[0])
    touched = [lorakit.patch.targets.find_module(comps, p).weight for p in la.layers]  # type: ignore[union-attr]
    touched_bytes = sum(p.numel() * p.element_size() for p in touched)
    print(f"LoRA: {len(la.layers)} layers, {files[0].stat().st_size / 2**20:.1f} MiB; touched parameters "
          f"{touched_bytes / 2**30:.2f} GiB")
    results = {"floor_copy_touched": floor_seconds(touched)}
    results["addmm_pass_touched"] = addmm_seconds(touched, la, list(la.layers))
    results.update(lorakit_phase(comps, *files))
    if not args.skip_diffusers:
        results.update(diffusers_phase(comps, files[0]))
    results["touched_gib"] = touched_bytes / 2 ** 30
    report(results, args)


def report(r: dict[str, float], args: argparse.Namespace) -> None:
    print(json.dumps({k: round(v, 3) for k, v in r.items()}, indent=1))
    floor, switch = r["floor_copy_touched"], r["switch_best_of_3"]
    bound = max(floor, r["addmm_pass_touched"])
    print(f"\ncompute bound = max(copy floor {floor:.3f} s, addmm pass {r['addmm_pass_touched']:.3f} s) = {bound:.3f} s")
    print(f"**switch A→B / compute bound**                    {switch / bound:5.2f}×  (target ≤ 1.15×; median "
          f"{r['switch_median_of_3'] / bound:.2f}×)")
    print(f"switch A→B / copy floor                           {switch / floor:5.2f}×")
    print(f"cold first apply / floor                          {r['apply_A_cold'] / floor:5.2f}×")
    print(f"re-apply the same set                             {r['reapply_same'] * 1000:5.1f} ms")
    print(f"restore                                           {r['restore'] * 1000:5.1f} ms")
    if "diffusers_fuse" in r:
        d_apply = r["diffusers_load"] + r["diffusers_fuse"]
        d_remove = r["diffusers_unfuse"] + r["diffusers_unload"]
        print(f"diffusers switch (unfuse+unload+load+fuse) / lorakit switch  {(d_apply + d_remove) / switch:5.1f}×"
              "  (target ≥ 5×)")
        print(f"diffusers load+fuse / lorakit cold first apply              {d_apply / r['apply_A_cold']:5.1f}×")
        print(f"diffusers unfuse+unload / lorakit restore                   {d_remove / r['restore']:5.1f}×")
    print(f"peak RSS over model {r['peak_rss_over_model_gib']:.2f} GiB; touched parameters {r['touched_gib']:.2f} GiB"
          f" → {r['peak_rss_over_model_gib'] / r['touched_gib']:.3f}× (target ≤ 1)")


if __name__ == "__main__":
    main()
