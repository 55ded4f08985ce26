"""The host side of a LoRA switch on full-size SD1.5 / SDXL shapes, measured without a GPU.

On a GPU a switch is host-bound (the 2026-11-26 H200 run: ~84 µs of Python and launches per layer against ~7 µs of
GPU work). That host side is measured here on models with SD1.5's and SDXL's exact layer structure (350 / 1,052
layers that kohya's LoCon reaches) but every width 40, in fp16 on the CPU: each op's arithmetic is then a few
hundred multiply-adds, so a switch's time is lorakit's Python plus torch's per-op dispatch — the part of a GPU
switch that this CPU can measure and cut. The switch takes the CUDA fp16 path (one ``addmm`` per weight: the CPU
is counted as a GEMM device here). (The ``meta`` device is no stand-in: its ``addmm`` runs Python decompositions.)

Per model: two kohya LoCon files (``switch.kohya_targets``; rank 1 by default, so that the CPU's fp16 arithmetic —
slow here, ~150 µs per layer at rank 32 — does not hide the host side); switch A→B→A… with originals on the device,
recorded (the default: a set switched back to replays its prepared ``addmm`` list) and eager (nothing recorded);
ms per switch and µs per switched layer (best and median of ``--repeats``), the torch ops per layer, the recorded
``addmm`` calls alone (torch without lorakit), and with ``--profile`` the functions that take the time.

    python benchmarks/host_side.py                 # SD1.5 and SDXL
    python benchmarks/host_side.py --arch sd1 --profile
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import best_of  # noqa: E402
from switch import kohya_targets  # noqa: E402

import lorakit  # noqa: E402
from lorakit.files.io import save_file  # noqa: E402
from lorakit.lora_model import load_lora  # noqa: E402
from lorakit.models import configs  # noqa: E402
from lorakit.patch import Patcher, fused  # noqa: E402
from tests.factories import make_kohya_lora  # noqa: E402

WIDTH = 40  # divisible by SDXL's head counts (5, 10, 20) and SD1's head width 8


def narrow_configs(arch: str) -> dict[str, dict[str, object]]:
    """``arch``'s configs with the same blocks and layers, every width ``WIDTH``."""
    cfgs = {name: dict(cfg) for name, cfg in configs.ARCHS[arch].items()}
    unet = cfgs["unet"]
    levels = len(unet.get("block_out_channels", [320, 640, 1280, 1280]))
    unet.update(block_out_channels=[WIDTH] * levels, norm_num_groups=8, cross_attention_dim=WIDTH)
    if arch == "sdxl":
        unet.update(cross_attention_dim=2 * WIDTH, addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + WIDTH)
    for name in cfgs:
        if name != "unet":
            cfgs[name].update(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=4,
                              projection_dim=WIDTH)
    return cfgs


def build(arch: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    saved = configs.ARCHS[arch]
    configs.ARCHS[arch] = narrow_configs(arch)
    try:
        comps = configs.build_components(arch, device="cpu")
    finally:
        configs.ARCHS[arch] = saved
    return {k: v.to(torch.float16).eval().requires_grad_(False) for k, v in comps.items()}


def ops_per_switch(patcher: Patcher, lora: lorakit.LoraModel) -> int:
    """torch ops one switch dispatches (what becomes kernel launches on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        patcher.set([(lora, 1.0)], log_reports=False)
    return Count.n


def make_loras(comps: dict[str, torch.nn.Module], folder: Path, rank: int) -> list[lorakit.LoraModel]:
    # make_kohya_lora only reads the weights' shapes; its factors are CPU tensors.
    out = []
    for seed, name in enumerate(("a", "b")):
        sd = make_kohya_lora(comps, kohya_targets, rank=rank, seed=seed, alpha=rank / 2, dtype=torch.float16)
        save_file(sd, folder / f"{name}.safetensors")
        out.append(load_lora(folder / f"{name}.safetensors"))
    return out


def measure(arch: str, repeats: int, profile: bool, rank: int) -> dict[str, dict[str, float]]:
    """Per way of switching — ``recorded`` (the default: a set switched back to replays its prepared ``addmm``
    list) and ``eager`` (nothing recorded: every switch worked out again) — the switch's times and ops."""
    comps = build(arch)
    with tempfile.TemporaryDirectory() as tmp:
        loras = make_loras(comps, Path(tmp), rank)
    out = {}
    for mode in ("recorded", "eager"):
        patcher = Patcher(comps)
        patcher.fused.originals_mode = "device"
        patcher.fused.recorded.enabled = mode == "recorded"
        patcher.set([(loras[0], 1.0)], log_reports=False)
        layers = len(patcher._modules)
        for lo in (loras[1], loras[0], loras[1]):  # resolved, placed, recorded: what follows is the switch
            patcher.set([(lo, 1.0)], log_reports=False)
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            patcher.set([(loras[i % 2], 1.0)], log_reports=False)
            times.append(time.perf_counter() - t)
        bare = best_of(repeats, patcher.fused.recorded.held()[0].work) \
            if mode == "recorded" else float("nan")  # the recorded addmm list called directly: torch alone
        if profile:
            print(f"{arch}, {mode}:")
            profile_switches(patcher, loras, layers)
        ops = ops_per_switch(patcher, loras[len(times) % 2])
        patcher.restore()
        out[mode] = {"layers": layers, "ops_per_layer": ops / layers, "best_ms": min(times) * 1e3,
                     "median_ms": statistics.median(times) * 1e3, "us_per_layer_best": min(times) / layers * 1e6,
                     "us_per_layer_median": statistics.median(times) / layers * 1e6,
                     "bare_us_per_layer": bare / layers * 1e6}
    return out


def profile_switches(patcher: Patcher, loras: list[lorakit.LoraModel], layers: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for i in range(4):
        patcher.set([(loras[i % 2], 1.0)], log_reports=False)
    prof.disable()
    stats = pstats.Stats(prof)
    own = sum(v[2] for k, v in stats.stats.items() if "/lorakit/" in k[0]) / 4  # type: ignore[attr-defined]
    print(f"lorakit's own Python (self time, profiled): {own / layers * 1e6:.1f} µs per layer")
    stats.sort_stats("tottime").print_stats("/lorakit/", 15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("sd1", "sdxl"), action="append")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rank", type=int, default=1, help="LoRA rank (1: the arithmetic vanishes; the host side does "
                                                        "not depend on it)")
    a = p.parse_args()
    torch.set_num_threads(1)
    fused.GEMM_DEVICES.add("cpu")  # the CUDA fp16 path: one addmm per weight
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, rank {a.rank}, width {WIDTH}, fp16")
    print("| model | switch | layers | switch best / median (ms) | µs per layer best / median | torch ops per layer "
          "| the same addmm calls alone (µs per layer) |")
    print("|---|---|---|---|---|---|---|")
    for arch in a.arch or ["sd1", "sdxl"]:
        for mode, r in measure(arch, a.repeats, a.profile, a.rank).items():
            print(f"| {arch} | {mode} | {r['layers']} | {r['best_ms']:.1f} / {r['median_ms']:.1f} | "
                  f"{r['us_per_layer_best']:.1f} / {r['us_per_layer_median']:.1f} | {r['ops_per_layer']:.1f} | "
                  f"{r['bare_us_per_layer']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
