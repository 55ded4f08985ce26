"""The HTTP ingress on Ray Serve: ``lorakit serve``'s very application (``server.app.app_for``: the A1111 routes,
the library routes, the page) over a ``ClusterState``, plus what only a cluster has:

- ``GET /lorakit/v1/cluster``: each replica's model, queue, LoRA switches and placed sets (the job table's view);
- ``/sdapi/v1/embeddings`` answered by a model replica (it needs the text encoders);
- 503 (``ClusterUnavailable``, with ``Retry-After``) and 409 (``TaskConflict``) answers.

The app is built per ingress replica (Serve's late-bound ``__serve_build_asgi_app__``: nothing is pickled), once
the first model replica has reported its model to the job table.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from ..server.app import app_for
from ..server.guards import SafeJSONResponse
from ..server.state import ServerState
from .config import ClusterConfig
from .queue import ClusterUnavailable, TaskConflict
from .state import ClusterState

FIRST_MODEL_S = 3600.0  # how long the ingress waits for the first replica to load its model
RETRY_AFTER_S = 30


class LorakitIngress:
    async def __init__(self, model: Any, table: Any, config: dict[str, Any]) -> None:  # type: ignore[misc]
        self.cfg = ClusterConfig.from_args(config)
        self.model, self.table = model, table

    async def __serve_build_asgi_app__(self) -> FastAPI:
        deadline = time.monotonic() + FIRST_MODEL_S
        while (await self.table.view.remote())["model"] is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no model replica reported a model in {FIRST_MODEL_S:g} s")
            await asyncio.sleep(0.2)
        state = await run_in_threadpool(ClusterState, self.cfg, self.model, self.table)
        return cluster_app(state)


def cluster_app(state: ClusterState) -> FastAPI:
    app = app_for(cast(ServerState, state), state.cfg.api_auth)  # duck-typed: ClusterState has ServerState's face
    app.add_exception_handler(ClusterUnavailable, _unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(TaskConflict, _conflict)  # type: ignore[arg-type]
    _replace_route(app, "/sdapi/v1/embeddings")

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        return dict(state.model_handle.embeddings_list.remote().result(timeout_s=120))

    @app.get("/lorakit/v1/cluster")
    def cluster() -> dict[str, Any]:
        """Each replica's line of the job table (model, queue, ``switches``, ``placements``), and the routing."""
        return {**state.queue.cluster(), "routing": state.cfg.routing, "sets_per_replica": state.cfg.sets_per_replica}

    return app


def _replace_route(app: FastAPI, path: str) -> None:
    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path == path)]


async def _unavailable(request: HttpRequest, exc: ClusterUnavailable) -> SafeJSONResponse:
    return SafeJSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                            content={"error": "ClusterUnavailable", "detail": str(exc), "errors": str(exc)})


async def _conflict(request: HttpRequest, exc: TaskConflict) -> SafeJSONResponse:
    return SafeJSONResponse(status_code=409, content={"error": "TaskConflict", "detail": str(exc), "errors": str(exc)})
