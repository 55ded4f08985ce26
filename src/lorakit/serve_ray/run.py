"""``lorakit serve --ray``: start Ray here (or join a cluster), start Serve's HTTP proxy, deploy the application,
serve until Ctrl+C. Every failure before serving is one line (``ServeConfigError``, exit 2).

A local Ray gets more logical CPUs than the replicas reserve (the ingress and the job table reserve none), so
every replica is placed even on a 2-core machine — else Serve waits for ever for a CPU. Workers of a local Ray
inherit this process's environment (``PYTHONPATH`` included); on a cluster lorakit must be installed on every node
(or shipped with a ``runtime_env``: ``docs/serving.md``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from typing import Any
from urllib.parse import urlparse

from .config import APP_NAME, ClusterConfig, ServeConfigError, ingress_options, model_options, table_options

INSTALL = "pip install 'lorakit[ray]' (or: pip install 'ray[serve]')"
REACH_S = 5.0


def import_serve() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401  (the part of the extra often missing)
    except ImportError:
        raise ServeConfigError(f"--ray needs Ray Serve, which is not installed: {INSTALL}") from None
    return ray


def check_reachable(address: str) -> None:
    """A ``host:port`` or ``ray://host:port`` that accepts no TCP connection in ``REACH_S`` is one line at once
    (``ray.init`` would wait a minute and print a traceback). ``auto`` is left to Ray."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port  # a port past 65535 or not a number raises here
    except ValueError:
        port = None
    if not parsed.hostname or not port:
        raise ServeConfigError(f"--address must be auto, host:port or ray://host:port (a port 1…65535), got "
                               f"{address!r}")
    try:
        socket.create_connection((parsed.hostname, port), timeout=REACH_S).close()
    except OSError as e:
        raise ServeConfigError(f"cannot reach Ray at {address}: {e.strerror or e}") from None


def start_ray(cfg: ClusterConfig, address: str | None) -> bool:
    """Join ``address`` or start a local Ray; whether this call started it. A bad ``address`` is refused first,
    Ray installed or not."""
    if address:
        check_reachable(address)
    ray = import_serve()
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            replicas = cfg.autoscale[1] if cfg.autoscale else cfg.replicas
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(replicas * cfg.replica_cpus) + 1), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ServeConfigError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return True


def with_gpus(cfg: ClusterConfig, gpus_flag: float | None) -> ClusterConfig:
    """One GPU per replica where the cluster has GPUs and ``--replica-gpus`` was not given."""
    import ray

    if gpus_flag is None and ray.cluster_resources().get("GPU", 0) > 0:
        return dataclasses.replace(cfg, replica_gpus=1.0)
    return cfg


def deploy(cfg: ClusterConfig, host: str, port: int) -> str:
    from ray import serve

    from .deployments import build

    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build(cfg), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # a replica that cannot start (Serve gave up after its retries)
        raise ServeConfigError(f"the application did not start: {str(e).strip().splitlines()[0][:500]}") from None
    return f"http://{host}:{port}/"


def serve_forever(cfg: ClusterConfig, host: str, port: int, address: str | None, gpus_flag: float | None) -> int:
    started = start_ray(cfg, address)
    from ray import serve

    try:
        cfg = with_gpus(cfg, gpus_flag)
        url = deploy(cfg, host, port)
        scale = f"{cfg.autoscale[0]}–{cfg.autoscale[1]} (autoscaled)" if cfg.autoscale else str(cfg.replicas)
        print(f"lorakit: serving the page and the A1111 API on {url} with {scale} model replicas on Ray Serve "
              "(Ctrl+C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.delete(APP_NAME) if not started else serve.shutdown()
        if started:
            import ray

            ray.shutdown()


def serve_config(cfg: ClusterConfig, host: str, port: int) -> str:
    """A Serve config file (``serve deploy``; a KubeRay ``RayService``'s ``serveConfigV2``) for ``cfg``."""
    import yaml  # comes with Ray

    deployments = [{"name": "LorakitModel", **model_options(cfg)}, {"name": "LorakitIngress", **ingress_options(cfg)},
                   {"name": "LorakitJobs", **table_options()}]
    doc = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
           "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path":
                             "lorakit.serve_ray.deployments:app_builder", "args": cfg.as_args(),
                             "deployments": deployments}]}
    return "# lorakit serve --ray as a Serve config: serve deploy FILE (docs/serving.md)\n" + \
        yaml.safe_dump(doc, sort_keys=False)
