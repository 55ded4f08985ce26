"""One generation at a time, in arrival order, on one worker thread — so each request sees exactly its own
LoRAs (the model's weights are shared state), and A1111's ``/progress`` can report the running job."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from ..generate.pipeline import Generator, Request, Result


@dataclass
class Progress:
    job_count: int = 0  # queued + running
    job_no: int = 0  # jobs finished since start
    step: int = 0
    steps: int = 0
    started: float = 0.0  # time.time() of the running job, 0 when idle
    job_timestamp: str = "0"


class GenerationQueue:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.progress = Progress()
        self._lock = threading.Lock()
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        generator.on_step = self._on_step
        self._thread = threading.Thread(target=self._run, name="lorakit-generate", daemon=True)
        self._thread.start()

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run ``requests`` back to back as one job (A1111's ``n_iter``) and wait for them."""
        results: list[Result] = self.submit(lambda: [self.generator(r) for r in requests]).result()
        return results

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            self.progress.job_count += 1
        self._jobs.put((fn, future))
        return future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.generator.close()

    def snapshot(self) -> Progress:
        with self._lock:
            return Progress(**vars(self.progress))

    def _on_step(self, step: int, steps: int) -> None:
        with self._lock:
            self.progress.step, self.progress.steps = step, steps

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            with self._lock:
                self.progress.started = time.time()
                self.progress.job_timestamp = time.strftime("%Y%m%d%H%M%S")
                self.progress.step = self.progress.steps = 0
            try:
                future.set_result(fn())
            except BaseException as e:  # the generator has already put every weight back
                future.set_exception(e)
            finally:
                with self._lock:
                    self.progress.job_count -= 1
                    self.progress.job_no += 1
                    self.progress.started = 0.0
