"""One model replica: one base model on one device (``num_gpus: 1`` on a GPU cluster, CPU threads locally), running
every job through lorakit's own ``GenerationQueue`` — one worker thread, mixed-LoRA batches with ``--max-batch`` —
never ``@serve.batch`` (it would split batches by LoRA set and run the parts concurrently on one pipeline).

- The request's LoRA set is its multiplexed model id: ``placed`` is the ``@serve.multiplexed`` loader, built per
  replica with K = ``sets_per_replica``; Serve advertises the ids a replica holds and routes a set's requests to
  its holders. A set is applied by the worker when its job runs (switching only what changes; a set among the
  K recent ones rebuilds nothing).
- A job carries the model the cluster had when it was accepted; a replica on another model switches first,
  between jobs. The sync loop switches to the cluster's model as soon as it changes (the rolling switch).
- Every 0.1 s while busy (0.5 s idle), and at once when a job arrives or ends, the replica reports to the job
  table and gets back stop flags, the model and the library epoch (``table``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from ..generate.pipeline import Generator, Request, Result
from ..library import EmbeddingIndex, Library
from ..models.loading import BaseModel, load_model
from ..server.info_routes import embeddings_reply
from ..server.models import ModelEntry, entry_for
from ..server.worker import GenerationQueue
from .config import ClusterConfig
from .keys import MAX_COUNTED, SetCounter, set_key

log = logging.getLogger("lorakit.server")
BUSY_SYNC_S, IDLE_SYNC_S = 0.1, 0.5


@dataclass
class ClusterJob:
    """What the ingress sends a replica: the requests (seeds fixed), the model they were accepted under, the set's
    key (the multiplexed id; also used when routing is plain) and the client's task id."""

    requests: list[Request]
    model: dict[str, Any]  # the job table's model: title, entry_title, spec, …
    key: str
    task: str | None = None


class PlacedSet:
    """A LoRA set Serve counts as held by this replica (kept in its multiplexed LRU)."""

    def __init__(self, key: str) -> None:
        self.key = key


class CountingGenerator(Generator):
    """A ``Generator`` that counts LoRA switches in the order requests run (``keys.SetCounter``)."""

    counter: SetCounter

    def __call__(self, req: Request) -> Result:
        self.counter.observe(set_key(req, self._canonical))
        return super().__call__(req)

    def run_batch(self, requests: Any, max_images: int = 8) -> list[Any]:
        for req in requests:
            self.counter.observe(set_key(req, self._canonical))
        if len(requests) > 1:
            self.counter.observe_batch(len(requests))
        return super().run_batch(requests, max_images)

    def _canonical(self, name: str) -> str:
        return self.index.resolve(name).subpath


class LorakitModel:
    async def __init__(self, config: dict[str, Any], table: Any) -> None:  # type: ignore[misc]
        cfg = self.cfg = ClusterConfig.from_args(config)
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.table = table
        self.library = Library(cfg.lora_dirs, index=cfg.library_index)
        self.embeddings = EmbeddingIndex(cfg.embedding_dirs) if cfg.embedding_dirs else None
        self.entry = entry_for(cfg.model, [Path(d) for d in cfg.models_dirs])
        self.counter = SetCounter(cfg.sets_per_replica)
        self.placements: Counter[str] = Counter()
        self.served = 0
        model = await asyncio.to_thread(load_model, self.entry.spec, **cfg.device_options)
        self.queue = GenerationQueue(self._generator(model), cfg.max_batch, cfg.batch_window_ms)
        self.model = model
        self.generation, self.library_epoch = -1, 0
        self._switch_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        async def place(key: str) -> PlacedSet:  # a function, not a bound method: Serve keeps its LRU on it
            return await self._place(key)

        self.placed = serve.multiplexed(max_num_models_per_replica=cfg.sets_per_replica)(place)
        self._sync = asyncio.get_running_loop().create_task(self._sync_loop())
        log.info(f"replica {self.replica} (pid {os.getpid()}): model {model.describe()}")

    def _generator(self, model: BaseModel) -> CountingGenerator:
        model.pipe.set_progress_bar_config(disable=True)
        gen = CountingGenerator(model, self.library, self.embeddings)
        gen.counter = self.counter
        return gen

    async def _place(self, key: str) -> PlacedSet:
        self.placements[key] += 1
        if len(self.placements) > MAX_COUNTED:
            del self.placements[next(iter(self.placements))]
        return PlacedSet(key)

    async def generate(self, job: ClusterJob) -> list[Result]:
        await self.placed(serve.get_multiplexed_model_id() or job.key)
        await self._ensure_model(job.model)
        future = self.queue.submit_generate(job.requests)
        self._wake.set()  # report the new queue now
        try:
            results: list[Result] = await asyncio.wrap_future(future)
        finally:
            self._wake.set()  # and its end: /progress must not show a finished job as running
        self.served += 1
        return results

    async def switch_model(self, model: dict[str, Any]) -> dict[str, Any]:
        """Switch to ``model`` (between jobs); this replica's model info. A model that does not load raises
        ``ModelError`` and leaves the running one."""
        await self._ensure_model(model)
        return self.info()

    def info(self) -> dict[str, Any]:
        gen = self.queue.generator
        return {"title": ModelEntry.a1111(self.entry, self.model.hash)["title"], "entry_title": self.entry.title,
                "entry_name": self.entry.name, "spec": self.entry.spec, "name": self.model.name,
                "hash": self.model.hash, "arch": self.model.arch,
                "clip_layers": gen.family.clip_layers}

    def embeddings_list(self) -> dict[str, dict[str, Any]]:
        conditioner = self.queue.generator.conditioner
        if conditioner is None:
            every = embeddings_reply(self.queue.generator.family.embeddings, [])
            return {"loaded": {}, "skipped": {**every["loaded"], **every["skipped"]}}
        return embeddings_reply(conditioner.embeddings, conditioner.encoders)

    def check_health(self) -> None:
        if not self.queue._thread.is_alive():
            raise RuntimeError("the generation worker thread has stopped")

    async def _ensure_model(self, model: dict[str, Any]) -> None:
        async with self._switch_lock:
            if model["entry_title"] == self.entry.title:
                return
            entry = ModelEntry(model["entry_title"], model["entry_name"], model["spec"])
            future: Future[Any] = self.queue.submit(lambda: self._switch(entry))
            await asyncio.wrap_future(future)

    def _switch(self, entry: ModelEntry) -> None:
        """On the worker thread: load ``entry``, then drop the old model (``server.state`` does the same)."""
        log.info(f"replica {self.replica}: switching model {self.entry.title} → {entry.title}")
        new = load_model(entry.spec, **self.cfg.device_options)  # raises ModelError; the old model stays
        old = self.queue.generator
        generator = self._generator(new)
        generator.lora_mode = old.lora_mode
        old.close()
        self.queue.replace_generator(generator)
        self.model, self.entry = new, entry

    def report(self) -> dict[str, Any]:
        import time

        snap = self.queue.snapshot()
        return {"started": snap.started, "elapsed": time.time() - snap.started if snap.started else 0.0,
                "step": snap.step, "steps": snap.steps, "job_count": snap.job_count, "job_no": snap.job_no,
                "job_timestamp": snap.job_timestamp, "model": self.info(), "served": self.served, "pid": os.getpid(),
                "switches": self.counter.as_dict(), "placements": dict(self.placements)}

    async def _sync_loop(self) -> None:
        while True:
            try:
                report = self.report()
                reply = await self.table.report.remote(self.replica, report)
                await self._apply(reply, report["started"])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the table restarting: report again next time
                log.debug(f"replica {self.replica}: report failed ({type(e).__name__}: {e})")
            busy = self.queue.snapshot().job_count > 0
            try:
                await asyncio.wait_for(self._wake.wait(), BUSY_SYNC_S if busy else IDLE_SYNC_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _apply(self, reply: dict[str, Any], started: float) -> None:
        if reply["stop"] and self.queue.snapshot().started == started:  # the batch it was meant for
            self.queue.interrupt(reply["stop"])
        model = reply["model"]
        if model is not None and reply["generation"] != self.generation:
            self.generation = reply["generation"]
            if model["entry_title"] != self.entry.title:
                asyncio.get_running_loop().create_task(self._switch_quietly(model))
        if reply["library"] != self.library_epoch:
            self.library_epoch = reply["library"]
            await asyncio.to_thread(self.library.refresh)

    async def _switch_quietly(self, model: dict[str, Any]) -> None:
        try:
            await self._ensure_model(model)
        except Exception as e:  # the ingress checked it loads; a replica that cannot stays and says so
            log.error(f"replica {self.replica}: cannot switch to {model['entry_title']}: {e}")

    def __del__(self) -> None:
        sync = getattr(self, "_sync", None)
        if sync is not None:
            sync.cancel()
        queue = getattr(self, "queue", None)
        if queue is not None and threading.current_thread() is not queue._thread:
            queue.close()

