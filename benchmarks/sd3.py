"""SD3.5-Large at full width (hidden 2432, 38 heads × 64, MLP 9728) with fewer joint blocks (default 3, fp32, random
weights, CPU): apply, switch A→B and restore of two rank-16 diffusers-format files (PEFT keys
``transformer.transformer_blocks.N.attn.to_q.lora_A.weight`` …, no α: scale 1) over every Linear diffusers' SD3
LoRA training targets by default (``train_dreambooth_lora_sd3.py``: ``attn.to_q/k/v``, ``attn.to_out.0``,
``attn.add_q/k/v_proj``, ``attn.to_add_out``; ``--all-linears``: every Linear of the joint blocks), side by side
with diffusers' ``load_lora_weights`` + ``fuse_lora`` and its switch (``unfuse_lora`` + ``unload_lora_weights`` +
load + fuse of file B) on the same files, against this CPU's compute bound (the larger of the copy floor and one
fp32 ``addmm`` pass ``W + up@down`` over the touched weights; ``flux.py``'s); and the same layers as kohya files in
SAI names (``lora_unet_joint_blocks_N_x_block_attn_qkv`` …, q/k/v fused: the shape kohya's SD3 trainer writes),
which diffusers loads none of (ROUND3_NOTES §2.4), lorakit only.

Run with nothing else busy:  python benchmarks/sd3.py [--blocks 3 --rank 16 --all-linears --device cuda --dtype bf16]
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch
from _common import DTYPES, PeakRss, device_args, diffusers_load_fuse, diffusers_unfuse_unload, timed
from flux import addmm_seconds, floor_seconds, lorakit_phase, sync

import lorakit
from lorakit.files.io import save_file
from lorakit.keymap.arch import Arch
from lorakit.models.sd3_configs import transformer_config
from tests.factories import adapter_tensors
from tests.flux_factories import fused_weight
from tests.sd3_factories import kohya_keys, sai_table

# the default ``target_modules`` of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (no --lora_layers)
DIFFUSERS_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")


def build(blocks: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        tr = SD3Transformer2DModel(**dict(transformer_config(Arch.SD35_LARGE), num_layers=blocks))
    return tr.to(dtype).eval().requires_grad_(False)


def weight(tr: torch.nn.Module, path: str) -> torch.Tensor:
    return cast(torch.nn.Linear, tr.get_submodule(path)).weight


def targets(tr: torch.nn.Module, all_linears: bool) -> list[str]:
    """The joint blocks' Linears a file covers, as diffusers module paths (the last block has no ``to_add_out``)."""
    return [name for name, m in tr.named_modules() if isinstance(m, torch.nn.Linear)
            and name.startswith("transformer_blocks.")
            and (all_linears or name.split(".", 2)[2] in DIFFUSERS_TARGETS)]


def full_size_share(paths: list[str], all_linears: bool) -> float:
    """How many times the touched weights SD3.5-Large's 38 blocks hold (built on ``meta``: no memory)."""
    full = build(38, "meta")
    weights = {p: weight(full, p).numel() for p in targets(full, all_linears)}
    return sum(weights.values()) / sum(weights[p] for p in paths)


def peft_file(tr: torch.nn.Module, paths: list[str], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers-format (PEFT-keyed) LoRA over ``paths``, bf16 factors, no α (PEFT's default α = r: scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in paths:
        leaves = adapter_tensors("lora", tuple(weight(tr, p).shape), rank, gen)
        out[f"transformer.{p}.lora_A.weight"] = leaves["lora_down.weight"].to(torch.bfloat16)
        out[f"transformer.{p}.lora_B.weight"] = leaves["lora_up.weight"].to(torch.bfloat16)
    return out


def kohya_file(tr: torch.nn.Module, paths: list[str], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The same layers in SAI names, as kohya writes them: one LoRA per fused SAI module (``attn.qkv`` is q, k and v
    stacked by rows; the last block's 2·h context adaLN is half-swapped), bf16 factors, α = r/2."""
    gen = torch.Generator().manual_seed(seed)
    cfg: Any = getattr(tr, "config")
    wanted, layers = set(paths), {}
    for sai, (parts, swap) in sai_table(cfg.num_layers, qk_norm=bool(cfg.qk_norm)).items():
        if parts and set(parts) <= wanted:
            shape = tuple(fused_weight(tr, parts, swap).shape)
            layers[sai] = {k: v.to(torch.bfloat16) if v.dim() else v
                           for k, v in adapter_tensors("lora", shape, rank, gen, alpha=rank / 2).items()}
    return kohya_keys(layers)


def snapshot(tr: torch.nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    return {p: weight(tr, p).detach().clone() for p in paths}


def max_diff(tr: torch.nn.Module, ref: dict[str, torch.Tensor]) -> float:
    return max(float((weight(tr, p) - w).abs().max()) for p, w in ref.items())


def diffusers_phase(tr: torch.nn.Module, a: Path, b: Path, original: dict[str, torch.Tensor]) -> dict[str, float]:
    """diffusers on the same files: cold load + fuse of A, a switch (unfuse + unload + load + fuse of B; best and
    median of 3, B→A→B), the unfuse + unload that ends it, its peak RSS over the model, and how far its weights are
    from lorakit's when fused and from ``original`` after the unfuse (the weights of ``original``: block 0's)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=tr)
    r: dict[str, float] = {}
    check, device = list(original), next(tr.parameters()).device
    patcher = lorakit.patcher_for({"transformer": tr})
    patcher.set([(lorakit.load_lora(a), 1.0)])
    fused_by_lorakit = snapshot(tr, check)
    patcher.restore()

    gc.collect()
    with PeakRss() as mem:
        with timed(r, "diffusers_load_fuse_A_cold"):
            diffusers_load_fuse(pipe, a)
            sync(device)
        r["diffusers_vs_lorakit_max_abs"] = max_diff(tr, fused_by_lorakit)
        switches = []
        for path in (b, a, b):
            t = time.perf_counter()
            diffusers_unfuse_unload(pipe)
            diffusers_load_fuse(pipe, path)
            sync(device)
            switches.append(time.perf_counter() - t)
        with timed(r, "diffusers_unfuse_unload"):
            diffusers_unfuse_unload(pipe)
            sync(device)
    r["diffusers_switch_best_of_3"], r["diffusers_switch_median_of_3"] = min(switches), sorted(switches)[1]
    r["diffusers_peak_rss_over_model_gib"] = mem.peak_over / 2 ** 30
    r["diffusers_restore_max_abs"] = max_diff(tr, original)
    return r


def run_dialect(tr: torch.nn.Module, dialect: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    paths = targets(tr, args.all_linears)
    make = peft_file if dialect == "diffusers" else kohya_file
    files = []
    for i in range(2):
        files.append(tmp / f"{dialect}_{i}.safetensors")
        save_file(make(tr, paths, args.rank, i), files[-1])
    lora = lorakit.load_lora(files[0])
    touched = [weight(tr, p) for p in paths]
    if len(lora.layers) != len(paths):
        raise SystemExit(f"{dialect}: lorakit planned {len(lora.layers)} layers, the file covers {len(paths)}")
    r = {"touched_gib": sum(p.numel() * p.element_size() for p in touched) / 2 ** 30, "layers": float(len(paths)),
         "file_mib": files[0].stat().st_size / 2 ** 20,
         "full_size_x": full_size_share(paths, args.all_linears),
         "floor_copy_touched": floor_seconds(touched), "addmm_pass_touched": addmm_seconds(touched, args.rank)}
    original = snapshot(tr, [p for p in paths if p.startswith("transformer_blocks.0.")])
    r.update(lorakit_phase(tr, *files))
    r["lorakit_restore_max_abs"] = max_diff(tr, original)
    if dialect == "diffusers" and not args.skip_diffusers:
        r.update(diffusers_phase(tr, files[0], files[1], original))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--all-linears", action="store_true",
                    help="every Linear of the joint blocks, not diffusers' training default")
    for flag in ("--skip-diffusers", "--skip-kohya"):
        ap.add_argument(flag, action="store_true")
    device_args(ap)
    args = ap.parse_args()
    t0 = time.perf_counter()
    tr = build(args.blocks, args.device, getattr(torch, DTYPES[args.dtype]))
    params = sum(p.numel() for p in tr.parameters())
    print(f"built SD3.5-Large width 2432, {args.blocks} joint blocks, {params / 1e9:.2f} B params ({args.dtype}, "
          f"{args.device}) in {time.perf_counter() - t0:.1f} s")
    tmp = Path(tempfile.mkdtemp())
    dialects = ("diffusers",) if args.skip_kohya else ("diffusers", "kohya")
    results = {d: run_dialect(tr, d, args, tmp) for d in dialects}
    print(f"took {time.perf_counter() - t0:.0f} s")
    report(results)


def report(results: dict[str, dict[str, float]]) -> None:
    print(json.dumps({k: {n: float(f"{v:.4g}") for n, v in r.items()} for k, r in results.items()}, indent=1))
    for dialect, r in results.items():
        x = r["full_size_x"]
        bound = max(r["floor_copy_touched"], r["addmm_pass_touched"])
        switch = r["switch_best_of_3"]
        print(f"\n[{dialect}] {int(r['layers'])} layers, touched {r['touched_gib']:.2f} GiB, "
              f"file {r['file_mib']:.1f} MiB")
        print(f"  switch A→B {switch:.3f} s = {switch / bound:.2f}× the compute bound, "
              f"{switch / r['floor_copy_touched']:.2f}× the copy floor; median {r['switch_median_of_3'] / bound:.2f}×")
        peak = r["peak_rss_over_model_gib"]
        print(f"  cold apply {r['apply_A_cold']:.3f} s, restore {r['restore'] * 1000:.1f} ms; peak RSS over the model "
              f"{peak:.2f} GiB ({peak / r['touched_gib']:.2f}× touched); after restore, max |W − W₀| (block 0) "
              f"{r['lorakit_restore_max_abs']:.2e}")
        print(f"  extrapolated to 38 blocks (×{x:.1f} the touched weights): switch ≈ {switch * x:.1f} s, "
              f"cold apply ≈ {r['apply_A_cold'] * x:.1f} s")
        if "diffusers_switch_best_of_3" in r:
            d_apply, d_switch = r["diffusers_load_fuse_A_cold"], r["diffusers_switch_best_of_3"]
            print(f"  diffusers load+fuse {d_apply:.2f} s ({d_apply / r['apply_A_cold']:.1f}× lorakit's cold apply); "
                  f"switch {d_switch:.2f} s = {d_switch / switch:.1f}× lorakit's (median "
                  f"{r['diffusers_switch_median_of_3'] / r['switch_median_of_3']:.1f}×); unfuse+unload "
                  f"{r['diffusers_unfuse_unload']:.3f} s")
            print(f"  diffusers peak RSS over the model {r['diffusers_peak_rss_over_model_gib']:.2f} GiB; max |W| "
                  f"diffusers − lorakit (block 0) {r['diffusers_vs_lorakit_max_abs']:.2e}; after unfuse, max "
                  f"|W − W₀| {r['diffusers_restore_max_abs']:.2e}")


if __name__ == "__main__":
    main()
