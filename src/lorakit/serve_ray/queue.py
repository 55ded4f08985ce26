"""The ingress's stand-in for ``GenerationQueue``: the same calls (``generate``, ``snapshot``, ``interrupt``), but a
job goes to a model replica chosen by its LoRA set, progress and stops go through the cluster's job table — and no
request is lost.

Serve does not retry a request a replica has accepted: if the replica dies, the caller gets ``ActorDiedError``.
So this queue retries it on another replica — the seeds were fixed before the first try (``a1111.requests_of``),
so the image is the same — up to ``retries`` times, then answers 503 (``ClusterUnavailable``: retry later, with
the same key). A reply that needed a retry says so in its ``info.notes``. Every wait is bounded
(``request_timeout_s``): a request never hangs, even with no replica left. With an idempotency key (``Task``) the
job table answers a client's retry with the first answer (``done``), or waits for the attempt still running —
never a second image.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from ..generate.pipeline import Request, Result
from ..server.a1111 import Task
from ..server.worker import Progress
from .config import ClusterConfig
from .keys import job_key, routing_id
from .replica import ClusterJob

log = logging.getLogger("lorakit.server")
POLL_S = 5.0  # a waiting request wakes this often (keeps its task's lease, checks its deadline)
CALL_S = 30.0  # the job table answers within this


class ClusterUnavailable(Exception):
    """No replica could finish the request (they died, or none answered in time): HTTP 503, retry later."""


class TaskConflict(Exception):
    """An idempotency key already used for another request: HTTP 409."""


def retryable() -> tuple[type[BaseException], ...]:
    """The errors that mean the replica (or its node) went away, not that the request is bad."""
    import ray.exceptions as rex
    from ray.serve.exceptions import DeploymentUnavailableError

    return (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.NodeDiedError,
            rex.ObjectLostError, DeploymentUnavailableError)


def unwrapped(error: BaseException) -> BaseException:
    """The replica's own exception for a ``RayTaskError`` (a lorakit error stays the 422 it is alone)."""
    import ray.exceptions as rex

    cause = getattr(error, "cause", None) if isinstance(error, rex.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else error


def call(response: Any) -> Any:
    """A job-table call's result (bounded wait; its own errors unwrapped)."""
    try:
        return response.result(timeout_s=CALL_S)
    except Exception as e:
        raise unwrapped(e) from None


class ClusterQueue:
    def __init__(self, cfg: ClusterConfig, model: Any, table: Any, resolve: Any) -> None:
        self.cfg, self.model, self.table, self.resolve = cfg, model, table, resolve

    def generate(self, requests: list[Request], task: Task | None = None) -> list[Result]:
        view = call(self.table.view.remote())
        model = view["model"]
        job = ClusterJob(requests, model, routing_id(model["entry_title"], job_key(requests, self.resolve)),
                         task.id if task else None)
        if task is not None:
            earlier = self._claim(task)
            if earlier is not None:
                return earlier
        try:
            results = self._run(job, task)
        except BaseException:
            if task is not None:
                self.table.finish.remote(task.id, None)
            raise
        if task is not None:
            call(self.table.finish.remote(task.id, results, _size(results)))
        return results

    def _claim(self, task: Task) -> list[Result] | None:
        """``None``: this call runs the task; else the answer a run with the same key already gave."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        state = call(self.table.begin.remote(task.id, task.fingerprint))
        while state["state"] == "running":
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"task {task.id!r} is still running elsewhere; retry later with the same id")
            state = call(self.table.wait.remote(task.id, task.fingerprint, POLL_S))
        if state["state"] == "conflict":
            raise TaskConflict(f"task id {task.id!r} was already used for a different request; use a new id "
                               "(force_task_id or x-request-id) for a new request")
        return state.get("results") if state["state"] == "done" else None

    def _run(self, job: ClusterJob, task: Task | None) -> list[Result]:
        errors = retryable()
        deadline = time.monotonic() + self.cfg.request_timeout_s
        notes: list[str] = []
        for attempt in range(1, self.cfg.retries + 2):
            handle = self.model if self.cfg.routing == "plain" else self.model.options(multiplexed_model_id=job.key)
            try:
                results: list[Result] = self._wait(handle.generate.remote(job), task, deadline)
            except errors as e:
                notes.append(f"attempt {attempt}: {_what(e)}")
                log.warning(f"request {job.task or job.key}: attempt {attempt} failed ({_what(e)}); "
                            f"{'retrying on another replica' if attempt <= self.cfg.retries else 'giving up'}")
                time.sleep(min(0.5 * attempt, 3.0))
                continue
            except Exception as e:
                raise unwrapped(e) from None
            if notes:
                results[0].notes.append("lorakit serve --ray: retried on another replica, same seed "
                                        f"({'; '.join(notes)}; attempt {attempt} succeeded)")
            return results
        raise ClusterUnavailable(f"the request failed on {len(notes)} replicas in turn ({'; '.join(notes)}); the "
                                 "cluster is replacing them: retry in a minute (same force_task_id / x-request-id: "
                                 "never a second image)")

    def _wait(self, response: Any, task: Task | None, deadline: float) -> Any:
        while True:
            try:
                return response.result(timeout_s=min(POLL_S, max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    response.cancel()
                    raise ClusterUnavailable(f"no replica answered within {self.cfg.request_timeout_s:g} s "
                                             "(none running, or all busy); retry later") from None
                if task is not None:
                    self.table.touch.remote(task.id)

    def snapshot(self) -> Progress:
        s = call(self.table.snapshot.remote())
        return Progress(s["job_count"], s["job_no"], s["step"], s["steps"],
                        time.time() - s["elapsed"] if s["running"] else 0.0, s["job_timestamp"], s["stopping"])

    def cluster(self) -> dict[str, Any]:
        return dict(call(self.table.snapshot.remote()))

    def interrupt(self, kind: str = "interrupt") -> None:
        call(self.table.interrupt.remote(kind))

    def close(self) -> None:
        """Nothing to stop here: the replicas own their queues."""


def _what(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def _size(results: list[Result]) -> int:
    return sum(getattr(im, "width", 0) * getattr(im, "height", 0) * 4 for r in results for im in r.images)
