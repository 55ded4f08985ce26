"""Ray batch overhead vs a local batch: the same jobs file (16 requests, 2 LoRA sets) run by ``lorakit batch``'s
local runner and by its Ray runner (a local Ray, N actors), on the embedded demo model.

Measures wall time of each whole run (model loads included: that is what a user waits for), Ray's start, the
time to the first result, and checks the two runs' PNGs are the same bytes. Timings go to stdout as a table and
JSON.

Run with nothing else busy:  python benchmarks/batch.py [--requests 16] [--workers 2] [--steps 4] [--size 64]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lorakit.batch.jobs import local_runner, read_jobs, run_batch
from lorakit.batch.ray_runner import Pool, WorkerConfig, ray_runner
from lorakit.generate.pipeline import Generator
from lorakit.library import Library
from lorakit.models.loading import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


def write_jobs(path: Path, n: int, steps: int, size: int) -> None:
    lines = [{"prompt": f"a cat, picture {i}" + (" <lora:demo_style:0.8>" if i % 2 else ""), "seed": 100 + i,
              "steps": steps, "width": size, "height": size} for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def timed_run(jobs: Path, out: Path, runner: object) -> tuple[float, float]:
    """(whole run, until the first outcome) in seconds."""
    first: list[float] = []
    start = time.perf_counter()

    def wrap(items: list) -> object:  # type: ignore[type-arg]
        for outcome in runner(items):  # type: ignore[operator]
            if not first:
                first.append(time.perf_counter() - start)
            yield outcome

    summary = run_batch(read_jobs(jobs), out, wrap)  # type: ignore[arg-type]
    if summary.done != summary.total:
        raise SystemExit(f"{out}: {summary.failed} items failed")
    return time.perf_counter() - start, first[0]


def local(jobs: Path, out: Path) -> dict[str, float]:
    def make() -> Generator:
        model = load_model(None)
        model.pipe.set_progress_bar_config(disable=True)
        return Generator(model, Library([EXAMPLES]))

    total, first = timed_run(jobs, out, local_runner(make))
    return {"total_s": total, "first_result_s": first}


def on_ray(jobs: Path, out: Path, workers: int, threads: int) -> dict[str, float]:
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 1, workers + 2), include_dashboard=False, log_to_driver=False)
    init = time.perf_counter() - t
    try:
        config = WorkerConfig(None, {}, [str(EXAMPLES)], [], threads)
        total, first = timed_run(jobs, out, ray_runner(config, Pool(workers=workers)))
    finally:
        ray.shutdown()
    return {"ray_init_s": init, "total_s": total + init, "first_result_s": first + init}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads-per-worker", type=int, default=torch.get_num_threads(),
                    help="torch threads per actor (default: the local run's, so the images match bitwise)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs = root / "jobs.jsonl"
        write_jobs(jobs, args.requests, args.steps, args.size)
        results = {"local": local(jobs, root / "local"),
                   "ray": on_ray(jobs, root / "ray", args.workers, args.threads_per_worker)}
        same = all((root / "local" / p.name).read_bytes() == p.read_bytes() for p in (root / "ray").glob("*.png"))
    results["overhead_s"] = results["ray"]["total_s"] - results["local"]["total_s"]  # type: ignore[assignment]
    results["setup"] = {"requests": args.requests, "workers": args.workers, "steps": args.steps,  # type: ignore[assignment]
                        "size": args.size, "threads_per_worker": args.threads_per_worker,
                        "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "identical_pngs": same}
    print(f"{'run':<6} {'total':>8} {'first result':>13}")
    for name in ("local", "ray"):
        r = results[name]
        print(f"{name:<6} {r['total_s']:7.2f}s {r['first_result_s']:12.2f}s")  # type: ignore[index]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
