"""Batches on Ray (the optional extra ``lorakit[ray]``): Ray Data ``map_batches`` over the jobs with a fixed actor
pool (``compute=ray.data.ActorPoolStrategy(size=N)``; ``concurrency=`` is deprecated). Each actor loads the model
once and holds one ``Generator`` on one GPU (or on CPU threads); items are sorted by LoRA set before they are
split into blocks, so an actor meets a set's items one after another and switches weights rarely (a generator
keeps its LoRAs applied between requests). With ``max_images`` > 1 (``--max-batch``, default 8 as locally) each
block is instead one run of items exactly as a local run cuts them (``jobs.chunks``, file order), generated with
``Generator.run_batch``: compatible requests share UNet batches, each with its own LoRAs, and the batches — so the
images — are those of the local run.

Images travel back as raw pixels (``.npy`` bytes) and are written by the driver with the same code as a local
run, so the files are the same bytes. Bitwise-equal images also need the same arithmetic: on the CPU that means
the same number of torch threads, so each actor uses the driver's thread count unless told otherwise (Ray would
set 1). A local Ray gets more logical CPUs than the actors take, so the read task always finds one (an actor pool
that holds every CPU deadlocks it).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import BatchError, LorakitError
from .common import LoraSet
from .jobs import CHUNK, Item, Outcome, Runner, chunks, requests_from_row, run_item, run_items

INSTALL = "pip install 'lorakit[ray]' (or: pip install 'ray[data]')"
MAX_BLOCKS = 2000  # one item a block (results stream back one by one) up to this many items


@dataclass(frozen=True)
class WorkerConfig:
    """What each actor needs to build its generator (plain values: they travel to other machines)."""

    model: str | None = None  # None: the embedded demo model
    device_options: dict[str, str] = field(default_factory=dict)
    lora_dirs: list[str] = field(default_factory=list)
    embedding_dirs: list[str] = field(default_factory=list)
    threads: int = 0  # torch threads per actor; 0: leave Ray's setting
    max_images: int = 1  # > 1: runs of items share UNet batches of up to this many images (``run_items``)


@dataclass(frozen=True)
class Pool:
    workers: int = 1
    cpus: float = 1.0  # logical CPUs each actor reserves
    gpus: float = 0.0
    address: str | None = None  # None: start a local Ray


class GenerateWorker:
    """A Ray Data actor: one model, one generator, for every batch it is given. A model that does not load makes
    each of its items an error record (one clear line in results.jsonl), not a traceback from Ray."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray

        ctx = ray.get_runtime_context()
        self.name = f"ray:{(ctx.get_actor_id() or 'driver')[:8]}@{ctx.get_node_id()[:8]}:{os.getpid()}"
        self.failure: str | None = None
        try:
            self.gen = _generator(WorkerConfig(**config))
        except LorakitError as e:
            self.failure = f"the Ray worker could not load the model: {e}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row per item (``key``, ``line``, ``requests``), or rows that are whole runs (``run``: JSON list of
        item rows, with ``max_images``): one output row per item either way."""
        outcomes: list[Outcome] = []
        if "run" in batch:
            for run in batch["run"]:
                rows = [_Row(str(r["key"]), int(r["line"]), requests_from_row(r)) for r in json.loads(str(run))]
                outcomes += [self._failed(r.key, r.line) for r in rows] if self.failure is not None else \
                    run_items(self.gen, rows, self.name, int(batch["max_images"][0]))
        else:
            for key, line, requests in zip(batch["key"], batch["line"], batch["requests"]):
                outcomes.append(self._failed(str(key), int(line)) if self.failure is not None else
                                run_item(self.gen, str(key), int(line), requests_from_row({"requests": requests}),
                                         self.name))
        return {"record": np.array([json.dumps(o.record) for o in outcomes], dtype=object),
                "pixels": np.array([_pack(o.pixels) for o in outcomes], dtype=object)}

    def _failed(self, key: str, line: int) -> Outcome:
        return Outcome({"key": key, "line": line, "error": self.failure, "worker": self.name})


@dataclass(frozen=True)
class _Row:
    key: str
    line: int
    requests: list[Any]


def _generator(cfg: WorkerConfig) -> Any:
    import torch

    from ..generate.pipeline import Generator
    from ..library import EmbeddingIndex, Library
    from ..models.loading import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model, **cfg.device_options)
    model.pipe.set_progress_bar_config(disable=True)
    return Generator(model, Library(cfg.lora_dirs), EmbeddingIndex(cfg.embedding_dirs) if cfg.embedding_dirs else None)


def _pack(pixels: list[np.ndarray]) -> bytes:
    """(n, H, W, 3) uint8 as ``.npy`` bytes; no images (an error): empty bytes."""
    if not pixels:
        return b""
    buf = io.BytesIO()
    np.save(buf, np.stack(pixels), allow_pickle=False)
    return buf.getvalue()


def _unpack(data: bytes) -> list[np.ndarray]:
    return list(np.load(io.BytesIO(data), allow_pickle=False)) if data else []


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # the Data library is the part of the extra that is often missing
    except ImportError:
        raise BatchError(f"--ray needs Ray (with Ray Data), which is not installed: {INSTALL}") from None
    return ray


def group_order(items: list[Item]) -> list[Item]:
    """Items grouped by LoRA set, groups in order of first appearance, file order within a group."""
    groups: dict[LoraSet, list[Item]] = {}
    for item in items:
        groups.setdefault(item.lora_set, []).append(item)
    return [item for group in groups.values() for item in group]


def start(ray: Any, pool: Pool) -> bool:
    """Connect to ``pool.address``, or start a local Ray with more logical CPUs than the actors reserve. Returns
    whether this call started it (and so should shut it down); an already running Ray is used as it is."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if pool.address:
            ray.init(address=pool.address, **quiet)
        else:
            cpus = max(os.cpu_count() or 1, math.ceil(pool.workers * pool.cpus) + 1)
            ray.init(num_cpus=cpus, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise BatchError(f"cannot start or reach Ray{f' at {pool.address}' if pool.address else ''}: {e}") from None
    return True


def ray_runner(config: WorkerConfig, pool: Pool) -> Runner:
    """A runner (see ``jobs.run_batch``) that runs the items on a Ray actor pool, yielding outcomes as they end."""
    def run(items: list[Item]) -> Iterator[Outcome]:
        ray = import_ray()
        started = start(ray, pool)
        try:
            yield from _stream(ray, config, pool, items if config.max_images > 1 else group_order(items))
        finally:
            if started:
                ray.shutdown()
    return run


def _stream(ray: Any, config: WorkerConfig, pool: Pool, items: list[Item]) -> Iterator[Outcome]:
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # before: turning the bars off logs a warning
    ray.data.DataContext.get_current().enable_progress_bars = False  # lorakit draws one bar over the whole job
    if config.max_images > 1:
        rows: list[dict[str, Any]] = [
            {"run": json.dumps([item.as_row() for item in run]), "max_images": config.max_images}
            for run in chunks(items, CHUNK * config.max_images)]
    else:
        rows = [item.as_row() for item in items]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    ds = ds.map_batches(GenerateWorker, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=pool.workers),
                        fn_constructor_kwargs={"config": asdict(config)}, num_cpus=pool.cpus, num_gpus=pool.gpus)
    for row in ds.iter_rows():
        yield Outcome(json.loads(str(row["record"])), _unpack(bytes(row["pixels"])))
