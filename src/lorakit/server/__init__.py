"""``lorakit serve``: an AUTOMATIC1111-compatible HTTP API (``/sdapi/v1``), lorakit's own library endpoints
(``/lorakit/v1``) and a web page at ``/``. Thin: generation is ``pipeline.Generator``, one job at a time on one
worker thread (``worker.py``); the LoRA list is ``library.Library``."""
from .app import create_app, listen
from .worker import GenerationQueue

__all__ = ["GenerationQueue", "create_app", "listen"]
