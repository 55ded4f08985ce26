"""What stands between HTTP and the generator: a strict JSON body check, JSON responses that cannot fail to
render, a 422 for validation errors that never echoes a huge input, and one log line per request.

Python's ``json`` reads ``NaN``, ``Infinity``, ``1e400`` (→ inf) and lone surrogates (``"\\ud800"``) without
complaint; each later broke something (a 422 that could not be rendered, a prompt that could not be encoded), so
they are refused before validation with a 422 naming the field (``loc``: ``["body", "prompt"]``).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..prompt import SURROGATE

log = logging.getLogger("lorakit.server")
MAX_INT_DIGITS = 100  # Python's int() refuses > 4,300 digits with a ValueError; nothing here needs 100
MAX_DEPTH = 64  # A1111 bodies nest a few levels (alwayson_scripts); responses echo the body
MAX_INPUT_CHARS = 200  # of a rejected value, echoed in a 422
LORAS_KEY = "lorakit.loras"  # scope key: the LoRAs a txt2img request named, for its log line
QUIET = {("GET", "/sdapi/v1/progress", 200)}  # polled 4× a second by the page: not logged


class BadValue:
    """Stands in for a JSON value refused before validation (``problem`` says why) until its path is known."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def finite(value: Any) -> Any:
    """``value`` with every non-finite float as a string (``"nan"``, ``"inf"``), any other non-JSON type as its
    ``str``, lone surrogates replaced — so ``json.dumps(..., allow_nan=False)`` cannot fail on it."""
    stack: list[Any] = []

    def convert(v: Any) -> Any:
        if isinstance(v, str):
            return SURROGATE.sub("\ufffd", v)
        if v is None or isinstance(v, (bool, int)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else str(v)
        if isinstance(v, dict):
            out: dict[str, Any] = {}
            stack.append((v, out))
            return out
        if isinstance(v, (list, tuple)):
            items: list[Any] = []
            stack.append((v, items))
            return items
        return SURROGATE.sub("\ufffd", str(v))

    root = convert(value)
    while stack:  # iterative: a deeply nested value must not hit the recursion limit
        src, dst = stack.pop()
        if isinstance(dst, dict):
            for k, v in src.items():
                dst[str(convert(k))] = convert(v)
        else:
            dst.extend(convert(v) for v in src)
    return root


def safe_json(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON; cannot fail (NaN, inf, lone surrogates, odd types: see ``finite``)."""
    return json.dumps(finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class SafeJSONResponse(JSONResponse):
    """A JSON response whose rendering cannot fail (NaN, inf, lone surrogates, odd types)."""

    def render(self, content: Any) -> bytes:
        return safe_json(content)


def check_json(body: bytes) -> None:
    """Raise ``RequestValidationError`` (a 422) for a JSON body with a non-finite number, an integer of more than
    ``MAX_INT_DIGITS`` digits, a lone surrogate in any string, or nesting Python cannot parse. Malformed JSON is
    left to FastAPI (its own 422)."""
    try:
        value = json.loads(body, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise _invalid([], f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise _invalid([], "the body is not UTF-8 text") from None
    except ValueError:  # malformed JSON: FastAPI answers it (json_invalid, with the position)
        return
    found = _walk(value)
    if found is not None:
        raise _invalid(*found)


def _constant(name: str) -> BadValue:
    return BadValue(f"{name} is not a number JSON allows (numbers must be finite)")


def _float(text: str) -> float | BadValue:
    value = float(text)
    return value if math.isfinite(value) else BadValue(f"{text[:MAX_INPUT_CHARS]} is too large a number (numbers "
                                                       "must be finite)")


def _int(text: str) -> int | BadValue:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return BadValue(f"an integer of {len(text)} digits is too large")
    return int(text)


def _walk(value: Any) -> tuple[list[str | int], str] | None:
    """(path, problem) of the first refused number, string (value or key) with a lone surrogate, or value nested
    deeper than ``MAX_DEPTH`` (responses echo the body: rendering it must not hit the recursion limit), or ``None``."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        v, path = stack.pop()
        if isinstance(v, BadValue):
            return path, v.problem
        if len(path) > MAX_DEPTH:
            return path[:MAX_DEPTH], f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(v, str) and SURROGATE.search(v):
            return path, "a string with a lone surrogate (not valid Unicode text)"
        if isinstance(v, dict):
            for k, item in v.items():
                if SURROGATE.search(k):
                    return path + [SURROGATE.sub("\ufffd", k)], "a key with a lone surrogate (not valid Unicode)"
                stack.append((item, path + [k]))
        elif isinstance(v, list):
            stack.extend((item, path + [i]) for i, item in enumerate(v))
    return None


def _invalid(path: list[str | int], problem: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", *path), "msg": problem,
                                    "input": None}])


class StrictJsonRoute(APIRoute):
    """A route that runs ``check_json`` on a JSON body before FastAPI parses and validates it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
                if kind == "application/json" or kind.endswith("+json"):
                    body = await request.body()  # kept by the request: FastAPI reads it again from there
                    if body:
                        check_json(body)
            return await handler(request)

        return route


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's 422 ``{"detail": [{"loc", "msg", "type", "input"}]}``, with long inputs cut (a 10M-character
    prompt is not sent back) and every value renderable."""
    detail = []
    for error in exc.errors():
        item = {k: error[k] for k in ("type", "loc", "msg") if k in error}
        if "ctx" in error:
            item["ctx"] = finite(error["ctx"])
        if error.get("input") is not None:
            item["input"] = _cut(finite(error["input"]))
        detail.append(item)
    return SafeJSONResponse(status_code=422, content={"detail": detail})


def _cut(value: Any) -> Any:
    text = json.dumps(value, ensure_ascii=False)
    return value if len(text) <= MAX_INPUT_CHARS else text[:MAX_INPUT_CHARS] + f"… ({len(text)} characters)"


class RequestLog:
    """ASGI middleware: one INFO line per HTTP request on the ``lorakit.server`` logger —
    ``POST /sdapi/v1/txt2img 200 1.84 s LoRAs: demo_style, chars/unet_only`` (the LoRAs: what a txt2img route
    put under ``LORAS_KEY`` in the request's scope). Successful progress polls (``QUIET``) are not logged: the page
    polls four times a second while it generates."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if (scope["method"], scope["path"], status[0]) not in QUIET:
                loras = scope.get(LORAS_KEY)
                named = f" LoRAs: {', '.join(map(_printable, loras)) or 'none'}" if loras is not None else ""
                log.info(f"{scope['method']} {_printable(scope['path'])} {status[0]} "
                         f"{time.perf_counter() - start:.2f} s{named}")


def _printable(text: str, limit: int = 200) -> str:
    """``text`` for a log line: control characters (a newline could forge a line) as ``?``, cut to ``limit``."""
    cut = text[:limit] + ("…" if len(text) > limit else "")
    return "".join(c if c.isprintable() else "?" for c in cut)
