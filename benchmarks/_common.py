"""Shared helpers for the hand-run benchmarks: timing and a peak-RSS sampler."""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' LoRA factories
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype → the torch dtype's name


def device_args(ap: argparse.ArgumentParser) -> None:
    """``--device`` (default the CPU) and ``--dtype`` (``DTYPES``'s names, default fp32)."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))


def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def trim() -> None:
    """Give freed heap back to the OS, so RSS counts only live memory (else glibc's reuse of freed blocks hides
    new allocations from RSS): lorakit's own ``release_freed_memory`` on the CPU."""
    import torch

    from lorakit.models.device import release_freed_memory

    release_freed_memory(torch.device("cpu"))


class PeakRss:
    """Samples this process's RSS every 2 ms; ``peak_over`` is the peak above the RSS at start (after
    ``malloc_trim``)."""

    def __init__(self) -> None:
        trim()
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def peak_over(self) -> int:
        return self.peak - self.start


@contextmanager
def timed(results: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    results[name] = time.perf_counter() - t


def best_of(n: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def diffusers_load_fuse(pipe: object, lora_file: Path) -> None:
    """diffusers' own apply: load one LoRA file (adapter named after it) and fuse it at scale 1."""
    load: Callable[..., None] = pipe.load_lora_weights  # type: ignore[attr-defined]
    load(str(lora_file.parent), weight_name=lora_file.name, adapter_name=lora_file.stem)
    pipe.fuse_lora(lora_scale=1.0)  # type: ignore[attr-defined]


def diffusers_unfuse_unload(pipe: object) -> None:
    """diffusers' own undo: subtract the fused LoRA again, then drop its layers."""
    pipe.unfuse_lora()  # type: ignore[attr-defined]
    pipe.unload_lora_weights()  # type: ignore[attr-defined]


def diffusers_cycle(pipe: object, lora_file: Path) -> dict[str, float]:
    """diffusers' own load → fuse → unfuse → unload of one LoRA file on ``pipe``, each timed."""
    r: dict[str, float] = {}
    with timed(r, "diffusers_load"):
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="a")  # type: ignore[attr-defined]
    with timed(r, "diffusers_fuse"):
        pipe.fuse_lora(lora_scale=1.0)  # type: ignore[attr-defined]
    with timed(r, "diffusers_unfuse"):
        pipe.unfuse_lora()  # type: ignore[attr-defined]
    with timed(r, "diffusers_unload"):
        pipe.unload_lora_weights()  # type: ignore[attr-defined]
    return r


def switch_peak_gib(patcher: object, a: object, b: object) -> float:
    """Peak RSS over the start of apply A → switch to B → restore (after a collection): a switch's memory."""
    import gc

    gc.collect()
    with PeakRss() as mem:
        patcher.set([(a, 1.0)])  # type: ignore[attr-defined]
        patcher.set([(b, 1.0)])  # type: ignore[attr-defined]
        patcher.restore()  # type: ignore[attr-defined]
    return mem.peak_over / 2 ** 30
