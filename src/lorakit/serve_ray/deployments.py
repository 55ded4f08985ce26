"""The Serve application: ``LorakitIngress`` (HTTP, CPU) → ``LorakitModel`` (one model per replica, routed by LoRA
set) with ``LorakitJobs`` (the job table, one replica) beside them.

``build(cfg)`` is what ``lorakit serve --ray`` runs; ``app_builder`` is the same for Serve config files
(``import_path: lorakit.serve_ray.deployments:app_builder`` with ``args:`` = ``ClusterConfig`` fields), so
``serve run``, ``serve deploy`` and a KubeRay ``RayService`` start the very same application
(``docs/serving.md``).
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .config import ClusterConfig, ingress_options, model_options, table_options
from .ingress import LorakitIngress
from .replica import LorakitModel
from .table import JobTable


class LorakitJobs:
    """``table.JobTable`` behind a deployment; every method is ``async`` so that all run on the replica's one
    event loop (the table needs no locks)."""

    def __init__(self, options: dict[str, Any], options_file: str | None = None) -> None:
        self.jobs = JobTable(options, options_file)

    async def report(self, replica: str, report: dict[str, Any]) -> dict[str, Any]:
        return self.jobs.report(replica, report)

    async def snapshot(self) -> dict[str, Any]:
        return self.jobs.snapshot()

    async def interrupt(self, kind: str) -> int:
        return self.jobs.interrupt(kind)

    async def view(self) -> dict[str, Any]:
        return self.jobs.view()

    async def set_options(self, values: dict[str, Any]) -> dict[str, Any]:
        return self.jobs.set_options(values)

    async def set_model(self, model: dict[str, Any]) -> dict[str, Any]:
        return self.jobs.set_model(model)

    async def refresh_library(self) -> int:
        return self.jobs.refresh_library()

    async def begin(self, task: str, fingerprint: str) -> dict[str, Any]:
        return self.jobs.begin(task, fingerprint)

    async def touch(self, task: str) -> None:
        self.jobs.touch(task)

    async def finish(self, task: str, results: Any, size: int = 0) -> None:
        self.jobs.finish(task, results, size)

    async def wait(self, task: str, fingerprint: str, timeout_s: float) -> dict[str, Any]:
        return await self.jobs.wait(task, fingerprint, timeout_s)


def build(cfg: ClusterConfig) -> Application:
    options = {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "lorakit_auto_trigger_words": cfg.auto_triggers}
    table = serve.deployment(name="LorakitJobs", **table_options())(LorakitJobs).bind(options, cfg.options_file)
    model = serve.deployment(name="LorakitModel", **model_options(cfg))(LorakitModel).bind(cfg.replica_args(), table)
    ingress = serve.deployment(name="LorakitIngress", **ingress_options(cfg))(serve.ingress()(LorakitIngress))
    return ingress.bind(model, table, cfg.replica_args())


def app_builder(args: dict[str, Any]) -> Application:
    """For ``serve run`` / ``serve deploy`` / KubeRay: ``args`` are ``ClusterConfig`` fields."""
    return build(ClusterConfig.from_args(args))
