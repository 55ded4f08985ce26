"""The cluster's job table: what every ingress replica answers ``/progress``, ``/interrupt``, ``/skip`` and
``/options`` from, and where a client's idempotency key finds the answer it already got. One instance lives in
one Serve replica (``deployments.LorakitJobs``); it is plain Python, tested without Ray.

- Model replicas **report** every 0.1 s while busy (0.5 s idle): their queue (jobs waiting and running, the running
  batch's step), their model and their LoRA-switch counts. The reply carries what the cluster wants of them: stop
  the running batch (``/interrupt``, ``/skip``), the cluster's model (a replica on another one switches between
  jobs: the rolling switch) and the library's epoch (``/refresh-loras``: each replica re-scans).
- A stop names the batch it was meant for (the replica's ``started``): a batch that starts after the interrupt is
  never stopped by it.
- **Tasks** (idempotency keys): ``begin`` says new / running / done (with the results) / conflict; the owner
  ``touch``es a running task while it waits; a running task untouched for ``LEASE_S`` (its ingress died) is taken
  over by the next retry. Done answers are kept ``KEEP_S`` (bounded in count and bytes).
- Not durable: if this replica dies, Serve starts another, and progress, stops, options and keys start again
  (replicas re-report within a second; the model is taken from the first report).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..server.models import load_options, save_options

log = logging.getLogger("lorakit.server")
STALE_S = 10.0  # a replica not heard from for this long is left out of progress (dead or gone)
LEASE_S = 60.0  # a running task untouched this long: its ingress is gone, a retry takes it over
KEEP_S = 900.0  # done answers kept for retries this long
MAX_KEPT = 256
MAX_KEPT_BYTES = 256 * 2 ** 20


@dataclass
class _Task:
    fingerprint: str
    touched: float
    done: bool = False
    results: Any = None
    size: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)


class JobTable:
    def __init__(self, options: dict[str, Any], options_file: str | None = None) -> None:
        self.options_file = Path(options_file).expanduser() if options_file else None
        saved = {k: v for k, v in load_options(self.options_file).items()
                 if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")}
        self.options: dict[str, Any] = {**options, **saved}
        self.model: dict[str, Any] | None = None  # title, spec, name, hash, arch, clip_layers
        self.generation = 0  # of the model: +1 per switch
        self.library = 0  # epoch: +1 per refresh
        self.reports: dict[str, dict[str, Any]] = {}
        self.stops: dict[str, tuple[str, float]] = {}  # replica → (kind, started of the batch to stop)
        self.tasks: OrderedDict[str, _Task] = OrderedDict()

    # --- replicas -------------------------------------------------------------------------------------------
    def report(self, replica: str, report: dict[str, Any]) -> dict[str, Any]:
        """Record a replica's state; what the cluster wants of it."""
        self.reports[replica] = {**report, "at": time.monotonic()}
        if self.model is None and report.get("model"):
            self._set_model(report["model"], bump=False)
        stop = self.stops.get(replica)
        if stop is not None and stop[1] != report.get("started"):
            del self.stops[replica]  # that batch has ended
            stop = None
        return {"stop": stop[0] if stop else None, "model": self.model, "generation": self.generation,
                "library": self.library}

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)
        self.stops.pop(replica, None)

    def fresh(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {r: rep for r, rep in self.reports.items() if now - rep["at"] <= STALE_S}

    def interrupt(self, kind: str) -> int:
        """Stop every batch running now (``skip``: only its current request); how many."""
        running = {r: rep["started"] for r, rep in self.fresh().items() if rep.get("started")}
        for replica, started in running.items():
            self.stops[replica] = (kind, started)
        return len(running)

    def snapshot(self) -> dict[str, Any]:
        """A1111's progress for the whole cluster: jobs waiting or running everywhere, jobs done, and the step of
        the batch running longest (what a client waiting on one job sees); each replica's own line too."""
        now = time.monotonic()
        fresh = self.fresh()
        running = [rep for rep in fresh.values() if rep.get("started")]
        current = max(running, key=lambda rep: rep["elapsed"] + now - rep["at"], default=None)
        stamps = [str(rep.get("job_timestamp", "0")) for rep in fresh.values()]
        replicas = [{"replica": r, **{k: v for k, v in rep.items() if k != "at"}, "age_s": now - rep["at"]}
                    for r, rep in sorted(fresh.items())]
        return {"job_count": sum(int(rep.get("job_count", 0)) for rep in fresh.values()),
                "job_no": sum(int(rep.get("job_no", 0)) for rep in self.reports.values()),
                "step": current["step"] if current else 0, "steps": current["steps"] if current else 0,
                "elapsed": current["elapsed"] + now - current["at"] if current else 0.0,
                "running": bool(current), "stopping": self.stops.get(self._replica_of(current), (None,))[0],
                "job_timestamp": max(stamps, default="0"), "replicas": replicas}

    def _replica_of(self, report: dict[str, Any] | None) -> str:
        return next((r for r, rep in self.reports.items() if rep is report), "")

    # --- cluster state --------------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        return {"options": dict(self.options), "model": self.model, "generation": self.generation,
                "library": self.library}

    def set_options(self, values: dict[str, Any]) -> dict[str, Any]:
        self.options.update(values)
        self._save()
        return self.view()

    def set_model(self, model: dict[str, Any]) -> dict[str, Any]:
        """The cluster's model from now on (every replica switches to it between its jobs)."""
        self._set_model(model, bump=True)
        self._save()
        return self.view()

    def _set_model(self, model: dict[str, Any], bump: bool) -> None:
        self.model = dict(model)
        self.generation += bump
        self.options["sd_model_checkpoint"] = model["title"]
        self.options["sd_checkpoint_hash"] = model["hash"]

    def refresh_library(self) -> int:
        self.library += 1
        return self.library

    def _save(self) -> None:
        try:
            save_options(self.options_file, {k: v for k, v in self.options.items() if k != "sd_checkpoint_hash"})
        except OSError as e:
            log.warning(f"{self.options_file}: options not saved ({e})")

    # --- idempotency keys -----------------------------------------------------------------------------------
    def begin(self, task: str, fingerprint: str) -> dict[str, Any]:
        """``new`` (the caller runs it), ``running`` (another caller does: ``wait``), ``done`` (+ ``results``) or
        ``conflict`` (the key was used for another request)."""
        self._expire()
        entry = self.tasks.get(task)
        now = time.monotonic()
        if entry is not None and entry.fingerprint != fingerprint:
            return {"state": "conflict"}
        if entry is None or (not entry.done and now - entry.touched > LEASE_S):
            self.tasks[task] = _Task(fingerprint, now)
            return {"state": "new"}
        if entry.done:
            return {"state": "done", "results": entry.results}
        return {"state": "running"}

    def touch(self, task: str) -> None:
        entry = self.tasks.get(task)
        if entry is not None and not entry.done:
            entry.touched = time.monotonic()

    def finish(self, task: str, results: Any, size: int = 0) -> None:
        """The task's answer (``None``: it failed; the key is free for a retry)."""
        entry = self.tasks.get(task)
        if entry is None:
            return
        if results is None:
            del self.tasks[task]
        else:
            entry.done, entry.results, entry.size, entry.touched = True, results, size, time.monotonic()
            self.tasks.move_to_end(task)
        entry.event.set()
        self._expire()

    async def wait(self, task: str, fingerprint: str, timeout_s: float) -> dict[str, Any]:
        """``begin`` once the task is no longer running elsewhere, or after ``timeout_s`` (then ``running``)."""
        entry = self.tasks.get(task)
        if entry is not None and not entry.done:
            try:
                await asyncio.wait_for(asyncio.shield(entry.event.wait()), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.begin(task, fingerprint)

    def _expire(self) -> None:
        now = time.monotonic()
        done = [(k, t) for k, t in self.tasks.items() if t.done]
        total = sum(t.size for _, t in done)
        for key, entry in done:
            if now - entry.touched <= KEEP_S and len(done) <= MAX_KEPT and total <= MAX_KEPT_BYTES:
                break
            del self.tasks[key]
            done = done[1:]
            total -= entry.size
