"""``lorakit serve``: an AUTOMATIC1111-compatible HTTP API (``/sdapi/v1``), lorakit's own library endpoints
(``/lorakit/v1``) and a web page at ``/``. Thin: generation is ``pipeline.Generator``, one job at a time on one
worker thread (``worker.py``); the LoRA list is ``library.Library``.

The names below load lazily (PEP 562): ``lorakit``'s argument parser imports ``server.cli``, and every command
would otherwise pay for importing diffusers."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app, listen
    from .worker import GenerationQueue

__all__ = ["GenerationQueue", "create_app", "listen"]
_LAZY = {"create_app": "app", "listen": "app", "GenerationQueue": "worker"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lorakit.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
