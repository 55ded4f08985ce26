"""One generation at a time on one worker thread — so each request sees exactly its own LoRAs (the model's weights
are shared state), and A1111's ``/progress`` can report the running job.

With ``max_batch`` > 1, txt2img jobs waiting together — those that arrive within ``window_ms`` of the first — run
as one ``Generator.run_batch`` (up to ``max_batch`` images): requests that share size, steps, sampler and CFG sample
in one UNet batch, each with its own LoRA set. Otherwise jobs run in arrival order, one by one.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import LorakitError
from ..generate.pipeline import Generator, Request, Result

MAX_WINDOW_MS = 10_000.0


@dataclass
class Progress:
    job_count: int = 0  # queued + running
    job_no: int = 0  # jobs finished since start
    step: int = 0
    steps: int = 0
    started: float = 0.0  # time.time() of the running job, 0 when idle
    job_timestamp: str = "0"
    stopping: str | None = None  # "skip" / "interrupt" asked of the running job


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


@dataclass
class _Generate:
    requests: list[Request]
    future: Future[Any]

    @property
    def images(self) -> int:
        return sum(r.batch for r in self.requests)


_Item = _Call | _Generate | None  # None: stop


def check_batching(max_batch: int, window_ms: float) -> None:
    """Raise ``LorakitError`` for a max batch below 1 or a window outside 0 … 10 s."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise LorakitError(f"--max-batch must be a whole number ≥ 1, got {max_batch!r}")
    if not 0 <= window_ms <= MAX_WINDOW_MS:  # also False for NaN
        raise LorakitError(f"--batch-window-ms must be 0 to {MAX_WINDOW_MS:g}, got {window_ms!r}")


class GenerationQueue:
    def __init__(self, generator: Generator, max_batch: int = 1, window_ms: float = 50.0) -> None:
        check_batching(max_batch, window_ms)
        self.generator = generator
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.progress = Progress()
        self._lock = threading.Lock()
        self._jobs: queue.Queue[_Item] = queue.Queue()
        generator.on_step = self._on_step
        self._thread = threading.Thread(target=self._run, name="lorakit-generate", daemon=True)
        self._thread.start()

    def generate(self, requests: list[Request], task: Any = None) -> list[Result]:
        """Run ``requests`` as one job (A1111's ``n_iter``) and wait for them; the first error is raised.
        ``task``: the client's idempotency key (``a1111.Task``), used by the cluster's queue, not here."""
        results: list[Result] = self.submit_generate(requests).result()
        return results

    def submit_generate(self, requests: list[Request]) -> Future[Any]:
        """``generate`` without waiting: the future of the job's results (an async caller awaits it)."""
        if self.max_batch == 1:
            return self.submit(lambda: self._one_by_one(requests))
        future: Future[Any] = Future()
        self._put(_Generate(list(requests), future))
        return future

    def replace_generator(self, generator: Generator) -> None:
        """Run later jobs with ``generator`` (call on the worker thread, e.g. through ``submit``)."""
        generator.on_step = self._on_step
        self.generator = generator

    def _one_by_one(self, requests: list[Request]) -> list[Result]:
        """The job's requests in order; after an interrupt, those not started are dropped (at least one runs)."""
        results: list[Result] = []
        for req in requests:
            if results and self.generator.stopping == "interrupt":
                break
            results.append(self.generator(req))
        return results

    def interrupt(self, kind: str = "interrupt") -> None:
        """Stop the running job between steps (``skip``: only its current request); nothing when idle. The
        images so far are returned, the model's weights restored."""
        with self._lock:
            if self.progress.started:
                self.generator.stopping = kind

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._put(_Call(fn, future))
        return future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.generator.close()

    def snapshot(self) -> Progress:
        with self._lock:
            return Progress(**{**vars(self.progress), "stopping": self.generator.stopping})

    def _put(self, item: _Item) -> None:
        with self._lock:
            self.progress.job_count += 1
        self._jobs.put(item)

    def _on_step(self, step: int, steps: int) -> None:
        with self._lock:
            self.progress.step, self.progress.steps = step, steps

    def _run(self) -> None:
        carry: list[_Item] = []  # an item taken while collecting a batch that did not join it
        while (item := carry.pop() if carry else self._jobs.get()) is not None:
            if isinstance(item, _Generate):
                batch = self._collect(item, carry)
                with self._running(len(batch)):
                    self._run_batch(batch)
            else:
                with self._running(1):
                    _settle(item.future, item.fn)

    def _collect(self, first: _Generate, carry: list[_Item]) -> list[_Generate]:
        """``first`` and the txt2img jobs that arrive within the window, up to ``max_batch`` images; the first
        item that does not join goes to ``carry``."""
        batch, images = [first], first.images
        deadline = time.monotonic() + self.window
        while images < self.max_batch:
            try:
                item = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(item, _Generate) or images + item.images > self.max_batch:
                carry.append(item)
                break
            batch.append(item)
            images += item.images
        return batch

    def _run_batch(self, batch: list[_Generate]) -> None:
        try:
            results = self.generator.run_batch([r for job in batch for r in job.requests], self.max_batch)
        except BaseException as e:  # not a lorakit error: every job of the batch gets it
            for job in batch:
                job.future.set_exception(e)
            return
        start = 0
        for job in batch:
            mine = results[start:start + len(job.requests)]
            start += len(job.requests)
            error = next((r for r in mine if isinstance(r, BaseException)), None)
            job.future.set_exception(error) if error is not None else job.future.set_result(mine)

    @contextmanager
    def _running(self, jobs: int) -> Iterator[None]:
        """Progress while ``jobs`` jobs run (one batch or one call)."""
        with self._lock:
            self.progress.started = time.time()
            self.progress.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.progress.step = self.progress.steps = 0
            self.generator.stopping = None
        try:
            yield
        finally:
            with self._lock:
                self.progress.job_count -= jobs
                self.progress.job_no += jobs
                self.progress.started = 0.0
                self.generator.stopping = None


def _settle(future: Future[Any], fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as e:  # the generator has already put every weight back
        future.set_exception(e)
