"""A local Ray with lorakit's Serve application (``lorakit serve --ray``'s), for the tests and the benchmark: a free
loopback port, more logical CPUs than the replicas reserve, replicas that find this checkout (``PYTHONPATH``)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

from lorakit.serve_ray.config import APP_NAME, ClusterConfig

from .servers import free_port

SRC = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)


@contextmanager
def local_ray(cpus: int = 4) -> Iterator[Any]:
    import ray

    env = {"env_vars": {"PYTHONPATH": SRC}} if SRC else None
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env=env)
    try:
        yield ray
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def start_serve() -> str:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy(cfg: ClusterConfig) -> None:
    from ray import serve

    from lorakit.serve_ray.deployments import build

    serve.run(build(cfg), name=APP_NAME, route_prefix="/")


def deploy_config(doc: dict[str, Any], wait_s: float = 600.0) -> None:
    """Apply a Serve config (what ``serve deploy FILE`` sends) and wait until the application runs. Changing only
    a deployment's settings (``num_replicas``) updates it in place, as ``serve deploy`` does."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(doc))
    wait_for(lambda: _app_status() == "RUNNING", wait_s, "the application to run", every=1.0)


def _app_status() -> str:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is not None and app.status == "DEPLOY_FAILED":
        raise AssertionError(f"the application failed to deploy: {app.message}")
    return str(getattr(app.status, "value", app.status)) if app is not None else ""


def cluster_view(url: str) -> dict[str, Any]:
    return dict(requests.get(f"{url}/lorakit/v1/cluster", timeout=60).json())


def wait_for(check: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def replica_actor(ray: Any, replica: str) -> Any:
    """The Ray actor of a model replica (its id from ``/lorakit/v1/cluster``)."""
    return ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#LorakitModel#{replica}", namespace="serve")


def running_replicas(deployment: str = "LorakitModel") -> int:
    from ray import serve

    status = serve.status().applications[APP_NAME].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))
