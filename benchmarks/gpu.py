"""LoRAs on a GPU: switch, restore, generation speed and peak memory, on full-size SD1.5 and SDXL (random weights,
nothing downloads), fp16, side by side with diffusers.

Per model, two rank-32 kohya LoCon files (every layer kohya's LoCon reaches; ``switch.kohya_targets``):
(a) lorakit switch A→B vs the bandwidth floor — one read and one write of the touched weights, measured in the
    same run as a device copy of each touched tensor into a preallocated buffer (and as one flat copy of the same
    bytes: pure bandwidth, no launches) — and vs diffusers ``unfuse_lora``+``unload_lora_weights`` +
    ``load_lora_weights``+``fuse_lora``;
(b) restore (originals on the device: pointer swaps; on the host: one host→device copy);
(c) sampling speed, 20 steps (SD1.5 512 px, SDXL 1024 px, CFG 7, Euler), the same pipeline call with diffusers'
    fused LoRA and with lorakit's (``output_type="latent"``: random weights decode nothing worth seeing);
(d) peak memory over the bare model while applying A, switching to B, sampling 2 steps and restoring, with the
    originals on the device and on the host (the LoRA factors' own bytes are shown apart).

Prints a markdown table with the card's name and the total time (estimated at 3–5 minutes on one H100; meant to
stay under 8).
    python benchmarks/gpu.py                 # CUDA, fp16, SD1.5 and SDXL
    python benchmarks/gpu.py --smoke         # tiny models on the CPU in seconds: proves the script runs
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from switch import kohya_targets

import lorakit
from lorakit.files.io import save_file
from lorakit.models.device import resolve_device, resolve_dtype
from lorakit.patch.placement import clear_cache, lora_on
from lorakit.patch.targets import find_module
from tests.factories import make_kohya_lora

SIZES = {"sd1": 512, "sdxl": 1024}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object], repeats: int = 1) -> list[float]:
    """Wall seconds of each of ``repeats`` calls, the device drained before and after each."""
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def build(arch: str, smoke: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A pipeline of ``arch`` with random weights: full size (made on the device, default init), or tiny."""
    if smoke:
        from lorakit.models.loading import demo_model
        from tests.factories import tiny_sdxl_pipeline

        pipe = demo_model().pipe if arch == "sd1" else tiny_sdxl_pipeline()
    else:
        from diffusers import AutoencoderKL

        from lorakit.models.configs import SD_VAE, SDXL_VAE, build_components
        from lorakit.models.single_file import _assemble

        torch.manual_seed(0)
        c = build_components(arch, device=str(device))
        with torch.device(device):
            vae = AutoencoderKL(**(SDXL_VAE if arch == "sdxl" else SD_VAE))
        encoders = [c["text_encoder"]] + ([c["text_encoder_2"]] if arch == "sdxl" else [])
        pipe = _assemble(arch, c["unet"].eval(), vae.eval(), [e.eval() for e in encoders])
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(pipe: Any) -> dict[str, torch.nn.Module]:
    names = ("unet", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def make_loras(pipe: Any, rank: int, folder: Path) -> list[Path]:
    files = []
    for i, name in enumerate(("a", "b")):
        sd = make_kohya_lora(components(pipe), kohya_targets, rank=rank, seed=i, alpha=rank / 2, dtype=torch.float16)
        save_file(sd, folder / f"{name}.safetensors")
        files.append(folder / f"{name}.safetensors")
    return files


def floors(touched: list[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Copying each touched tensor into a preallocated buffer (what a switch must at least do), and the same
    bytes as one flat copy (the card's bandwidth alone)."""
    buffers = [torch.empty_like(t) for t in touched]
    per_tensor = min(timed(device, lambda: [b.copy_(t) for b, t in zip(buffers, touched)], 5))
    buffers.clear()
    n = sum(t.numel() for t in touched)
    flat_src = torch.empty(n, dtype=touched[0].dtype, device=device)
    flat_dst = torch.empty_like(flat_src)
    flat = min(timed(device, lambda: flat_dst.copy_(flat_src), 5))
    return {"floor_per_tensor": per_tensor, "floor_flat": flat}


def lorakit_switch(pipe: Any, loras: list[lorakit.LoraModel], device: torch.device, where: str) -> dict[str, float]:
    """``where``: the originals on the ``device`` (the default: a set switched back to replays its recorded
    ``addmm`` list, patch/recorded.py), on the ``host``, ``eager`` (on the device, nothing recorded: every switch
    worked out again) or ``graphs`` (on the device, each recording captured as a CUDA graph)."""
    patcher = lorakit.patcher_for(pipe)
    patcher.fused.originals_mode = "device" if where in ("eager", "graphs") else where
    patcher.fused.recorded.graphs = where == "graphs"
    patcher.fused.recorded.enabled = where != "eager"
    r = {f"apply_cold_{where}": timed(device, lambda: patcher.set([(loras[0], 1.0)]))[0]}
    times, host_side = [], []
    for lo in (loras[1], loras[0]) * 6:  # recorded: the first 2 of 12 eager or recording, the rest replays
        sync(device)
        t = time.perf_counter()
        patcher.set([(lo, 1.0)])
        host_side.append(time.perf_counter() - t)  # Python + launches: when ≈ the total, the switch is launch-bound
        sync(device)
        times.append(time.perf_counter() - t)
    r[f"switch_best_{where}"], r[f"switch_median_{where}"] = min(times), statistics.median(times)
    r[f"switch_host_side_{where}"] = min(host_side)
    r[f"restore_{where}"] = timed(device, patcher.restore)[0]
    patcher.fused.recorded.graphs, patcher.fused.recorded.enabled = False, True
    return r


def graph_bound(pipe: Any, lora: lorakit.LoraModel, device: torch.device) -> dict[str, float]:
    """What a switch would cost without Python: the same per-weight ``addmm`` (fp16 factors made beforehand) as an
    eager loop and replayed as one CUDA graph — the bound a graph-captured switch would reach (CUDA only)."""
    if device.type != "cuda":
        return {}
    comps = components(pipe)
    work = []
    for path, adapter in lora.layers.items():
        w = find_module(comps, path).weight.data  # type: ignore[union-attr]
        lr = adapter.low_rank()
        if lr is None or w.dtype != torch.float16:
            continue
        up, down, scale = lr
        w2 = w.view(w.shape[0], -1)
        work.append((w2, torch.empty_like(w2), up.to(device, w.dtype), down.to(device, w.dtype), scale))

    def run() -> None:
        for w2, out, u, d, a in work:
            torch.addmm(w2, u, d, alpha=a, out=out)

    eager = min(timed(device, run, 5))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    replay = min(timed(device, graph.replay, 5))
    graph.reset()
    return {"addmm_eager": eager, "addmm_graph": replay}


def diffusers_switch(pipe: Any, files: list[Path], device: torch.device) -> dict[str, float]:
    """unfuse + unload A, load + fuse B: what switching costs with diffusers' own LoRA support."""
    def load_fuse(f: Path) -> None:
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f.stem)
        pipe.fuse_lora(lora_scale=1.0)

    def unfuse_unload() -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    try:
        r = {"diffusers_load_fuse": timed(device, lambda: load_fuse(files[0]))[0]}
        r["diffusers_switch"] = timed(device, lambda: (unfuse_unload(), load_fuse(files[1])))[0]
        r["diffusers_unfuse_unload"] = timed(device, unfuse_unload)[0]
    except Exception as e:  # noqa: BLE001 — diffusers' kohya converter refuses some layer kinds on some versions
        print(f"  diffusers LoRA loading failed: {type(e).__name__}: {str(e)[:160]}")
        return {}
    return r


def sample(pipe: Any, size: int, steps: int) -> None:
    with torch.no_grad():
        pipe("a cabin in the woods, masterpiece", negative_prompt="blurry", num_inference_steps=steps,
             guidance_scale=7.0, width=size, height=size, output_type="latent",
             generator=torch.Generator().manual_seed(1))


def speeds(pipe: Any, files: list[Path], size: int, steps: int, device: torch.device) -> dict[str, float]:
    """it/s of the same call with diffusers' fused LoRA, then with lorakit's (best of 2 after a warm-up)."""
    r: dict[str, float] = {}
    try:
        pipe.load_lora_weights(str(files[0].parent), weight_name=files[0].name, adapter_name="speed")
        pipe.fuse_lora(lora_scale=1.0)
        sample(pipe, size, 2)
        r["its_diffusers"] = steps / min(timed(device, lambda: sample(pipe, size, steps), 2))
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    except Exception as e:  # noqa: BLE001 — as above: report and go on with lorakit's numbers
        print(f"  diffusers fused sampling failed: {type(e).__name__}: {str(e)[:160]}")
    with lorakit.apply_loras(pipe, [(files[0], 1.0)]):
        sample(pipe, size, 2)
        r["its_lorakit"] = steps / min(timed(device, lambda: sample(pipe, size, steps), 2))
    return r


def bare_peak(pipe: Any, size: int, device: torch.device) -> float | None:
    """Peak bytes of a 2-step sampling of the bare model (before any LoRA is on the device); CUDA only."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    sample(pipe, size, 2)
    return float(torch.cuda.max_memory_allocated(device))


def pinned_host(patcher: Any, loras: list[lorakit.LoraModel]) -> dict[str, float]:
    """Pinned host bytes held with the originals on the host (torch's pinned allocator: rounded blocks) against
    the exact bytes of the originals and both LoRAs' host-placed factors (models/host_memory.py packs them)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return {}
    cpu = {n: torch.device("cpu") for n in patcher.components}
    factors = sum(t.numel() * t.element_size() for lo in loras for a in lora_on(lo, cpu, pin=True).layers.values()
                  for t in a.t.values() if t.is_pinned())
    kept = sum(t.numel() * t.element_size() for t in patcher.fused.host.values())
    return {"pinned_bytes": float(stats().get("active_bytes.current", 0)), "pinned_exact": float(kept + factors)}


def peaks(pipe: Any, loras: list[lorakit.LoraModel], size: int, device: torch.device,
          bare: float | None) -> dict[str, float]:
    """Peak bytes over ``bare`` while applying A, switching to B, sampling 2 steps and restoring (CUDA only)."""
    if bare is None:
        return {}
    patcher = lorakit.patcher_for(pipe)
    r = {"model_bytes": float(sum(p.numel() * p.element_size() for m in components(pipe).values()
                                  for p in m.parameters()))}
    patcher.restore()
    clear_cache()  # factors placed on the card by the runs before: the host pass must not count them
    gc.collect()
    torch.cuda.empty_cache()
    for where in ("host", "device"):  # host first: the device pass leaves its factors placed (cached)
        patcher.fused.originals_mode = where
        torch.cuda.reset_peak_memory_stats(device)
        patcher.set([(loras[0], 1.0)])
        patcher.set([(loras[1], 1.0)])
        if where == "host":
            r.update(pinned_host(patcher, loras))
        sample(pipe, size, 2)
        patcher.restore()
        r[f"peak_over_{where}"] = float(torch.cuda.max_memory_allocated(device) - bare)
    devices = {n: device for n in components(pipe)}
    r["factor_bytes"] = float(sum(t.numel() * t.element_size() for lo in loras
                                  for a in lora_on(lo, devices).layers.values() for t in a.t.values()
                                  if t.device.type == device.type))
    return r


def run_arch(arch: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    t0 = time.perf_counter()
    pipe = build(arch, args.smoke, device, dtype)
    folder = Path(tempfile.mkdtemp())
    files = make_loras(pipe, args.rank, folder)
    loras = [lorakit.load_lora(f) for f in files]
    comps = components(pipe)
    touched = [find_module(comps, p).weight.data for p in loras[0].layers]  # type: ignore[union-attr]
    r: dict[str, float] = {"touched_bytes": float(sum(t.numel() * t.element_size() for t in touched))}
    print(f"{arch}: built and wrote LoRAs in {time.perf_counter() - t0:.0f} s; {len(touched)} layers touched")
    size, steps = (64, 2) if args.smoke else (SIZES[arch], 20)
    bare = bare_peak(pipe, size, device)
    phases: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("floors", lambda: floors(touched, device)),
        ("lorakit switch, originals on device", lambda: lorakit_switch(pipe, loras, device, "device")),
        ("lorakit switch, nothing recorded", lambda: lorakit_switch(pipe, loras, device, "eager")),
        ("lorakit switch, originals on host", lambda: lorakit_switch(pipe, loras, device, "host")),
        ("lorakit switch, recorded as CUDA graphs", lambda: lorakit_switch(pipe, loras, device, "graphs")),
        ("addmm loop: eager and as a CUDA graph", lambda: graph_bound(pipe, loras[1], device)),
        ("peak memory", lambda: peaks(pipe, loras, size, device, bare)),
        ("sampling speed", lambda: speeds(pipe, files, size, steps, device)),
        ("diffusers switch", lambda: diffusers_switch(pipe, files, device))]
    for name, phase in phases:
        t = time.perf_counter()
        r.update(phase())
        print(f"  {name}: {time.perf_counter() - t:.1f} s")
    print(f"{arch}: done in {time.perf_counter() - t0:.0f} s")
    return r


def row(name: str, values: dict[str, dict[str, float]], fmt: Callable[[dict[str, float]], str]) -> str:
    cells = []
    for r in values.values():
        try:
            cells.append(fmt(r))
        except (KeyError, ZeroDivisionError):
            cells.append("n/a")
    return f"| {name} | {' | '.join(cells)} |"


def report(results: dict[str, dict[str, float]], card: str, dtype: str, rank: int) -> None:
    ms = 1000.0
    print(f"\n{card}, {dtype}, two rank-{rank} kohya LoCon files; seconds unless stated\n")
    print(f"| | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    rows: list[tuple[str, Callable[[dict[str, float]], str]]] = [
        ("touched weights", lambda r: f"{r['touched_bytes'] / 2**30:.2f} GiB"),
        ("floor: copy each touched tensor / one flat copy",
         lambda r: f"{r['floor_per_tensor'] * ms:.1f} / {r['floor_flat'] * ms:.1f} ms"),
        ("lorakit cold apply A (originals on device / host)",
         lambda r: f"{r['apply_cold_device'] * ms:.1f} / {r['apply_cold_host'] * ms:.1f} ms"),
        ("lorakit switch A→B, best / median (originals on device; recorded addmm list, the default)",
         lambda r: f"{r['switch_best_device'] * ms:.1f} / {r['switch_median_device'] * ms:.1f} ms"),
        ("lorakit switch A→B, best / median (originals on device, nothing recorded: every sum worked out)",
         lambda r: f"{r['switch_best_eager'] * ms:.1f} / {r['switch_median_eager'] * ms:.1f} ms"),
        ("lorakit switch A→B, best / median (originals on host)",
         lambda r: f"{r['switch_best_host'] * ms:.1f} / {r['switch_median_host'] * ms:.1f} ms"),
        ("of which host side (Python + launches; device recorded / not / host originals)",
         lambda r: f"{r['switch_host_side_device'] * ms:.1f} / {r['switch_host_side_eager'] * ms:.1f} / "
                   f"{r['switch_host_side_host'] * ms:.1f} ms"),
        ("bound without Python: the switch's addmm calls eager / replayed as one CUDA graph",
         lambda r: f"{r['addmm_eager'] * ms:.1f} / {r['addmm_graph'] * ms:.1f} ms "
                   f"({r['addmm_graph'] / r['floor_per_tensor']:.2f}× the floor)"),
        ("**switch / floor** (device originals; target ≤ 1.5×)",
         lambda r: f"**{r['switch_best_device'] / r['floor_per_tensor']:.2f}×**"),
        ("lorakit switch A→B recorded as CUDA graphs (`LORAKIT_SWITCH_GRAPHS=1`), best / median; host side",
         lambda r: f"{r['switch_best_graphs'] * ms:.1f} / {r['switch_median_graphs'] * ms:.1f} ms; "
                   f"{r['switch_host_side_graphs'] * ms:.1f} ms"),
        ("**switch recorded as graphs / floor** (target ≤ 1.5×)",
         lambda r: f"**{r['switch_best_graphs'] / r['floor_per_tensor']:.2f}×**"),
        ("lorakit restore (device / host originals)",
         lambda r: f"{r['restore_device'] * ms:.1f} / {r['restore_host'] * ms:.1f} ms"),
        ("diffusers load+fuse / switch / unfuse+unload",
         lambda r: f"{r['diffusers_load_fuse']:.2f} / {r['diffusers_switch']:.2f} / {r['diffusers_unfuse_unload']:.2f}"),
        ("**diffusers switch / lorakit switch** (target ≥ 10×)",
         lambda r: f"**{r['diffusers_switch'] / r['switch_best_device']:.0f}×**"),
        ("sampling it/s: diffusers fused / lorakit", lambda r: f"{r['its_diffusers']:.2f} / {r['its_lorakit']:.2f}"),
        ("**lorakit slower than diffusers** (target ≤ 2 %)",
         lambda r: f"**{(r['its_diffusers'] / r['its_lorakit'] - 1) * 100:+.1f} %**"),
        ("peak over the bare model, originals on device / host",
         lambda r: f"{r['peak_over_device'] / 2**30:.2f} / {r['peak_over_host'] / 2**30:.2f} GiB"),
        ("pinned host memory with originals on the host: held / exact bytes (originals + both LoRAs' factors)",
         lambda r: f"{r['pinned_bytes'] / 2**30:.2f} / {r['pinned_exact'] / 2**30:.2f} GiB "
                   f"({r['pinned_bytes'] / r['pinned_exact']:.3f}×)"),
        ("**peak over bare, host originals, % of the model** (target ≤ 2 %)",
         lambda r: f"**{r['peak_over_host'] / r['model_bytes'] * 100:.1f} %** "
                   f"({(r['peak_over_host'] - r['factor_bytes']) / r['model_bytes'] * 100:.1f} % without the "
                   f"{r['factor_bytes'] / 2**20:.0f} MiB of LoRA factors)"),
    ]
    for name, fmt in rows:
        print(row(name, results, fmt))


def quiet() -> None:
    """diffusers and transformers report every LoRA key they fill in; the table is what matters here."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script runs")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="default fp16 (fp32 with --smoke: "
                                                                                 "half precision is slow on CPUs)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--arch", action="append", choices=list(SIZES), help="default: both")
    args = ap.parse_args()
    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    args.dtype = args.dtype or ("fp32" if args.smoke else "fp16")
    dtype = resolve_dtype(args.dtype, device)
    if args.smoke:
        args.rank = min(args.rank, 4)
    quiet()
    t0 = time.perf_counter()
    results = {}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (smoke: tiny models)"
    for arch in args.arch or list(SIZES):
        results[arch] = run_arch(arch, args, device, dtype)
        gc.collect()  # the model of one architecture goes before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # the table so far after each architecture: a run cut short still leaves its numbers
        report({("SD1.5" if a == "sd1" else "SDXL") + (" (tiny)" if args.smoke else ""): r
                for a, r in results.items()}, card, args.dtype, args.rank)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; torch {torch.__version__}")


if __name__ == "__main__":
    main()
