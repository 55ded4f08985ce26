"""``lorakit serve --ray`` side by side in one run, on a local Ray with the embedded demo model:

1. 32 txt2img requests over 8 LoRA sets (4 singles, 3 pairs, 1 triple) in a seeded random order, 4 in flight:
   2 replicas with LoRA-affinity routing (``max_ongoing_requests`` 2, the default, and 4), 2 replicas with Serve's
   plain routing (no multiplexed id), and one ``lorakit serve`` (its own process) — throughput, p50/p95 latency,
   LoRA switches per request (``changes``: weights re-patched; ``misses``: a set not among the K=4 most recent on
   its replica) and the replicas' share.
2. The overhead of Serve itself: the same 16 requests one at a time on one replica vs one ``lorakit serve``
   (alternating, twice each).

The single server runs in its own process throughout, its rounds interleaved with the cluster's.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src:. python benchmarks/serve_ray.py [--steps 4] [--size 64] [--rounds 2]
Each setup runs ``--rounds`` rounds of the requests, each round in another random order (a loaded machine's noise
shows as the spread between rounds).
Each replica and the single server use ``--threads`` torch threads (default 1: on a 2-core machine two replicas
already share the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests' helpers

from lorakit.library import Library  # noqa: E402
from lorakit.models.loading import demo_model  # noqa: E402
from lorakit.serve_ray.config import ClusterConfig  # noqa: E402
from lorakit.serve_ray.keys import SetCounter  # noqa: E402
from lorakit.server import create_app  # noqa: E402
from tests.serve_cluster import cluster_view, deploy, local_ray, start_serve, wait_for  # noqa: E402
from tests.servers import EXAMPLES, demo_lora_folder, free_port  # noqa: E402
from tests.test_serve_ray import SETS  # noqa: E402


def bodies(n: int, args: argparse.Namespace, seed: int = 5) -> list[dict[str, Any]]:
    order = [i % len(SETS) for i in range(n)]
    random.Random(seed).shuffle(order)
    return [{"prompt": f"a shape {SETS[s]}", "steps": args.steps, "width": args.size, "height": args.size,
             "cfg_scale": 5.0, "sampler_name": "Euler", "seed": 1000 + k} for k, s in enumerate(order)]


def timed(url: str, work: list[dict[str, Any]], in_flight: int) -> dict[str, Any]:
    def one(body: dict[str, Any]) -> float:
        t = time.perf_counter()
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        latencies = sorted(pool.map(one, work))
    wall = time.perf_counter() - start
    return {"requests": len(work), "wall_s": round(wall, 2), "req_per_s": round(len(work) / wall, 3),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 3)}


def switches(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Changes and misses during the run, per replica and per request."""
    def totals(view: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
        return {r["replica"]: (r["switches"]["changes_total"], r["switches"]["misses_total"], r["switches"]["requests"])
                for r in view["replicas"]}

    b, a = totals(before), totals(after)
    per = {r: tuple(x - y for x, y in zip(a[r], b.get(r, (0, 0, 0)))) for r in a}
    requests_ = sum(p[2] for p in per.values())
    return {"changes": sum(p[0] for p in per.values()), "misses": sum(p[1] for p in per.values()),
            "changes_per_request": round(sum(p[0] for p in per.values()) / max(1, requests_), 3),
            "misses_per_request": round(sum(p[1] for p in per.values()) / max(1, requests_), 3),
            "requests_per_replica": sorted(p[2] for p in per.values())}


def on_cluster(url: str, work: list[dict[str, Any]], in_flight: int) -> dict[str, Any]:
    wait_for(lambda: all(r["age_s"] < 2 for r in cluster_view(url)["replicas"]), 120, "replicas reporting")
    before = cluster_view(url)
    out = timed(url, work, in_flight)
    time.sleep(1.0)  # the replicas' last reports
    return {**out, **switches(before, cluster_view(url))}


def serve_single(port: int, folder: str, index: str, threads: int) -> None:
    """The single ``lorakit serve`` (``--single-server``), in its own process as a user runs it — not beside this
    script's client threads under one GIL — with its LoRA switches counted (``GET /bench/switches``)."""
    import uvicorn

    from lorakit.serve_ray.replica import CountingGenerator

    torch.set_num_threads(threads)
    model = demo_model()
    app = create_app(model, Library([Path(folder)], index=Path(index)))
    state = app.state.lorakit
    gen = CountingGenerator(model, state.library, None)
    gen.counter = SetCounter(4)
    state.queue.submit(lambda: state.queue.replace_generator(gen)).result()
    app.get("/bench/switches")(gen.counter.as_dict)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@contextmanager
def single_server(folder: Path, index: Path, threads: int) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--single-server", str(port), str(folder), str(index),
                             str(threads)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{url}/bench/switches") or proc.poll() is not None, 300, "lorakit serve")
        if proc.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {proc.returncode}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


def on_single(url: str, work: list[dict[str, Any]], in_flight: int) -> dict[str, Any]:
    before = requests.get(f"{url}/bench/switches", timeout=30).json()
    out = timed(url, work, in_flight)
    after = requests.get(f"{url}/bench/switches", timeout=30).json()
    n = after["requests"] - before["requests"]
    changes, misses = (after[f"{k}_total"] - before[f"{k}_total"] for k in ("changes", "misses"))
    return {**out, "changes": changes, "misses": misses, "changes_per_request": round(changes / n, 3),
            "misses_per_request": round(misses / n, 3), "requests_per_replica": [n]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="runs of the requests (each a new random order) per setup")
    p.add_argument("--single-server", nargs=4, metavar=("PORT", "FOLDER", "INDEX", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single_server:
        port, folder_, index, threads = args.single_server
        return serve_single(int(port), folder_, index, int(threads))
    root = Path(tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    folder = demo_lora_folder(root / "loras")
    shutil.copy(EXAMPLES / "blueprint_style.safetensors", folder / "blueprint_style.safetensors")
    # max_ongoing_requests: the default (2 × max_batch = 2), and 4 (= the requests in flight: a holder may take all)
    cfg = ClusterConfig(lora_dirs=[str(folder)], library_index=str(root / "index.db"), replicas=2,
                        threads=args.threads)
    rounds = [bodies(args.requests, args, seed=5 + r) for r in range(args.rounds)]
    solo = bodies(16, args, seed=9)
    results: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                               "load_before": os.getloadavg(), "cpus": os.cpu_count(), "steps": args.steps,
                               "size": args.size, "threads": args.threads}
    # The single server stays up through the Ray runs, its rounds interleaved with the cluster's: on a machine
    # shared with other work, the load then drifts over both alike.
    with single_server(folder, root / "single.db", args.threads) as one, local_ray(cpus=4):
        timed(one, bodies(4, args, seed=1), 2)  # warm-up
        results["single"] = [on_single(one, rounds[0], 4)]
        url = start_serve()
        setups = (("affinity", cfg), ("plain", replace(cfg, routing="plain")),
                  ("affinity_max_ongoing_4", replace(cfg, max_ongoing_requests=4)))
        for name, c in setups:  # each deploy replaces the replicas (fresh, no set placed)
            deploy(c)
            timed(url, bodies(4, args, seed=1), 2)  # warm-up
            results[name] = [on_cluster(url, work, 4) for work in rounds]
        results["single"] += [on_single(one, work, 4) for work in rounds[1:]]
        deploy(replace(cfg, replicas=1))
        wait_for(lambda: len(cluster_view(url)["replicas"]) == 1, 120, "one replica reporting")
        timed(url, bodies(4, args, seed=1), 1)  # warm-up
        for name, at in (("single_one_at_a_time", one), ("serve_one_replica_one_at_a_time", url)) * 2:
            measure = on_single if at == one else on_cluster
            results.setdefault(name, []).append(measure(at, solo, 1))
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
