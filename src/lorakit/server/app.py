"""The FastAPI application: A1111's ``/sdapi/v1`` endpoints, lorakit's ``/lorakit/v1`` library endpoints, the page.

Errors: a malformed body or a value out of range is a 422 from validation (``guards``: also NaN, inf, lone
surrogates, over-long prompts); a lorakit error (unknown LoRA, an SD1 LoRA on an SDXL model, …) is a 422
``{"error", "detail", "errors"}`` naming the problem — never a 500. Every response renders (``SafeJSONResponse``);
each request is logged in one line (``guards.RequestLog``).
"""
from __future__ import annotations

import base64
import binascii
import secrets
import socket
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..errors import LorakitError
from ..generate.pipeline import Generator
from ..library import EmbeddingIndex, Library
from ..library.listing import a1111_loras, entry_dict, fit
from ..models.loading import BaseModel
from ..prompt import parse_prompt
from . import a1111
from .a1111_img2img import Img2Img, echoed, img2img_requests
from .info_routes import add_info_routes
from .library_routes import add_library_routes, warm_listing
from .guards import LORAS_KEY, RequestLog, SafeJSONResponse, StrictJsonRoute, safe_json, validation_error
from .models import ModelCatalog
from .state import Loader, ServerState

STATIC = Path(__file__).parent / "static"


def create_app(model: BaseModel, library: Library, embeddings: EmbeddingIndex | None = None,
               api_auth: str | None = None, auto_triggers: bool = False, max_batch: int = 1,
               batch_window_ms: float = 50.0, catalog: ModelCatalog | None = None,
               options_file: Path | None = None, loader: Loader | None = None) -> FastAPI:
    """``max_batch`` > 1: txt2img requests arriving within ``batch_window_ms`` of each other share UNet batches
    of up to ``max_batch`` images, each with its own LoRAs (``server.worker``). ``catalog``: the models a client
    may switch to (``server.models``; default: the demo model and this one), loaded by ``loader`` (default:
    ``load_model`` on this model's device and dtype). ``options_file``: where posted options are saved and read
    back from at start (None: not saved)."""
    state = ServerState(model, library, embeddings, auto_triggers, max_batch, batch_window_ms, catalog,
                        options_file, loader)
    return app_for(state, api_auth)


def app_for(state: ServerState, api_auth: str | None = None) -> FastAPI:
    """The application over ``state``: this process's model (``create_app``), or a cluster's
    (``serve_ray.ingress``: the same routes over a state whose queue sends jobs to model replicas)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warm_listing(state)  # in a thread: the page's first visit finds the LoRA list encoded
        yield
        await run_in_threadpool(state.queue.close)

    app = FastAPI(title="lorakit", version="0.1.0", lifespan=lifespan, default_response_class=SafeJSONResponse)
    app.router.route_class = StrictJsonRoute  # before any route is added
    app.state.lorakit = state
    if api_auth:
        _add_auth(app, api_auth)
    app.add_middleware(RequestLog)  # added last: outermost, so it also logs a 401
    app.add_exception_handler(LorakitError, _lorakit_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    _a1111_routes(app, state)
    add_library_routes(app, state)
    add_info_routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.get("/", include_in_schema=False)(lambda: FileResponse(STATIC / "index.html"))
    app.get("/favicon.ico", include_in_schema=False)(lambda: FileResponse(STATIC / "favicon.svg"))
    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn (bound as uvicorn binds: ``SO_REUSEADDR``, IPv6 when the host
    has a ``:``) — bound before the model loads, so that a port in use fails at once. Raises ``OSError``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def _lorakit_error(request: HttpRequest, exc: LorakitError) -> JSONResponse:
    return SafeJSONResponse(status_code=422, content={"error": type(exc).__name__, "detail": str(exc), "body": "",
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
    def generate(req: a1111.Txt2Img, http: HttpRequest, make: Callable[..., list[Any]],
                 parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        overrides = a1111.checked_options(req.override_settings, state.clip_layers, ("body", "override_settings"))
        options = {**state.options, **overrides}
        # Parsed here too, so a malformed tag is refused before the job waits for the worker.
        refs = parse_prompt(req.prompt).loras + parse_prompt(req.negative_prompt, negative=True).loras
        http.scope[LORAS_KEY] = [r.name for r in refs]
        if req.batch_size * req.n_iter > a1111.MAX_IMAGES:
            raise LorakitError(f"batch_size × n_iter must be at most {a1111.MAX_IMAGES}, got "
                               f"{req.batch_size * req.n_iter}")
        jobs = make(req, int(options["CLIP_stop_at_last_layers"]), bool(options["lorakit_auto_trigger_words"]))
        results = state.queue.generate(jobs, a1111.task_of(req, http.headers))
        stamp = state.queue.snapshot().job_timestamp
        return a1111.response(req, results, state.model.name, state.model.hash, stamp, parameters)

    @app.post("/sdapi/v1/txt2img")
    def txt2img(req: a1111.Txt2Img, http: HttpRequest) -> dict[str, Any]:
        return generate(req, http, a1111.requests_of)

    @app.post("/sdapi/v1/img2img")
    def img2img(req: Img2Img, http: HttpRequest) -> dict[str, Any]:
        return generate(req, http, img2img_requests, echoed(req))

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        return a1111_loras(state.library)

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        state.library.refresh()

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        current = state.catalog.current
        return [e.a1111(state.model.hash if e == current else None) for e in state.catalog.entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        state.catalog.refresh()

    app.get("/sdapi/v1/samplers")(a1111.samplers)
    app.get("/sdapi/v1/schedulers")(lambda: [{"name": "automatic", "label": "Automatic", "aliases": None},
                                             {"name": "karras", "label": "Karras", "aliases": None}])
    app.get("/sdapi/v1/scripts")(lambda: {"txt2img": [], "img2img": []})
    app.get("/sdapi/v1/progress")(lambda: a1111.progress(state.queue.snapshot()))

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        state.queue.interrupt("interrupt")
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict[str, Any]:
        state.queue.interrupt("skip")
        return {}


    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return dict(state.options)

    @app.post("/sdapi/v1/options")
    def set_options(values: dict[str, Any]) -> None:
        state.set_options(values)
