"""The FastAPI application: A1111's ``/sdapi/v1`` endpoints, lorakit's ``/lorakit/v1`` library endpoints, the page.

Errors: a malformed body or a value out of range is a 422 from validation; a lorakit error (unknown LoRA, an SD1
LoRA on an SDXL model, …) is a 422 ``{"error", "detail", "errors"}`` naming the problem — never a 500.
"""
from __future__ import annotations

import base64
import binascii
import secrets
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..errors import LorakitError
from ..generate.pipeline import Generator
from ..library import EmbeddingIndex, Library
from ..library.listing import entry_dict, incompatibility
from ..models.loading import BaseModel
from . import a1111
from .worker import GenerationQueue

STATIC = Path(__file__).parent / "static"


class ServerState:
    def __init__(self, model: BaseModel, library: Library, embeddings: EmbeddingIndex | None,
                 auto_triggers: bool) -> None:
        self.model, self.library = model, library
        model.pipe.set_progress_bar_config(disable=True)  # progress goes to /sdapi/v1/progress, not the console
        self.queue = GenerationQueue(Generator(model, library, embeddings))
        self.title = f"{model.name} [{model.hash}]"
        self.options: dict[str, Any] = {"sd_model_checkpoint": self.title, "sd_checkpoint_hash": model.hash,
                                        "CLIP_stop_at_last_layers": 1, "samples_format": "png",
                                        "lorakit_auto_trigger_words": auto_triggers}

    def set_options(self, values: dict[str, Any]) -> None:
        name = values.get("sd_model_checkpoint")
        if name is not None and name not in (self.title, self.model.name, self.model.hash):
            raise LorakitError(f"model {name!r} not found; this server runs {self.title!r}")
        self.options.update({k: v for k, v in values.items() if k != "sd_model_checkpoint"})


def create_app(model: BaseModel, library: Library, embeddings: EmbeddingIndex | None = None,
               api_auth: str | None = None, auto_triggers: bool = False) -> FastAPI:
    state = ServerState(model, library, embeddings, auto_triggers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(state.queue.close)

    app = FastAPI(title="lorakit", version="0.1.0", lifespan=lifespan)
    app.state.lorakit = state
    if api_auth:
        _add_auth(app, api_auth)
    app.add_exception_handler(LorakitError, _lorakit_error)  # type: ignore[arg-type]
    _a1111_routes(app, state)
    _library_routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.get("/", include_in_schema=False)(lambda: FileResponse(STATIC / "index.html"))
    return app


async def _lorakit_error(request: HttpRequest, exc: LorakitError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"error": type(exc).__name__, "detail": str(exc), "body": "",
                                                  "errors": str(exc)})


def _add_auth(app: FastAPI, credentials: str) -> None:
    if ":" not in credentials:
        raise LorakitError("--api-auth must be USER:PASSWORD")
    expected = credentials.encode()

    @app.middleware("http")
    async def basic_auth(request: HttpRequest, call_next: Callable[[HttpRequest], Awaitable[Response]]) -> Response:
        header = request.headers.get("authorization", "")
        given = b""
        if header.lower().startswith("basic "):
            try:
                given = base64.b64decode(header[6:].strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
        if not secrets.compare_digest(given, expected):
            return JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="lorakit"'})
        return await call_next(request)


def _a1111_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/sdapi/v1/txt2img")
    def txt2img(req: a1111.Txt2Img) -> dict[str, Any]:
        clip_skip = int(state.options.get("CLIP_stop_at_last_layers") or 1)
        jobs = a1111.requests_of(req, clip_skip, bool(state.options.get("lorakit_auto_trigger_words")))
        if req.batch_size * req.n_iter > a1111.MAX_IMAGES:
            raise LorakitError(f"batch_size × n_iter must be at most {a1111.MAX_IMAGES}, got "
                               f"{req.batch_size * req.n_iter}")
        results = state.queue.generate(jobs)
        stamp = state.queue.snapshot().job_timestamp
        return a1111.response(req, results, state.model.name, state.model.hash, stamp)

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        entries = state.library.entries
        return [{"name": e.name, "alias": e.alias or e.name, "path": str(e.path), "metadata": meta}
                for e, meta in zip(entries, state.library.metadata(entries))]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        state.library.refresh()

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": state.title, "model_name": state.model.name, "hash": state.model.hash, "sha256": None,
                 "filename": state.model.name, "config": None}]

    app.get("/sdapi/v1/samplers")(a1111.samplers)
    app.get("/sdapi/v1/schedulers")(lambda: [{"name": "automatic", "label": "Automatic", "aliases": None},
                                             {"name": "karras", "label": "Karras", "aliases": None}])
    app.get("/sdapi/v1/scripts")(lambda: {"txt2img": [], "img2img": []})
    app.get("/sdapi/v1/progress")(lambda: a1111.progress(state.queue.snapshot()))

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return dict(state.options)

    @app.post("/sdapi/v1/options")
    def set_options(values: dict[str, Any]) -> None:
        state.set_options(values)


def _library_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/lorakit/v1/loras")
    def library(base: str | None = None, search: str | None = None) -> dict[str, Any]:
        entries = state.library.search(base or None, search)
        stems = Counter(e.name.lower() for e in state.library.entries)
        out = []
        for e in entries:
            item = entry_dict(e)
            reason = incompatibility(e.base, state.model.arch)
            item.update(compatible=reason is None, reason=reason,
                        prompt_name=e.name if stems[e.name.lower()] == 1 else e.subpath,
                        preview_url=f"/lorakit/v1/loras/{e.id}/preview" if item["preview"] else None)
            out.append(item)
        return {"model": {"title": state.title, "arch": state.model.arch}, "loras": out,
                "auto_trigger_words": bool(state.options.get("lorakit_auto_trigger_words"))}

    @app.get("/lorakit/v1/loras/{entry_id}/preview")
    def preview(entry_id: str) -> FileResponse:
        e = state.library.by_id(entry_id)
        if not e.sidecars.preview:
            raise LorakitError(f"{e.subpath}: no preview image")
        return FileResponse(e.path.parent / e.sidecars.preview)

    @app.post("/lorakit/v1/refresh")
    def refresh() -> dict[str, float]:
        return state.library.refresh()
