"""lorakit's own library endpoints, what the page shows: ``/lorakit/v1/loras`` (every LoRA with whether it fits
the running model), previews, re-scan, and ``/lorakit/v1/model`` (the running model and its native size).

The whole list is encoded once per scan and kept (``Listing``): 10,000 entries take ~1 s to build and encode on
this 2-core VM, ~10 ms to send from the cache. It is rebuilt when the scan, the model or the auto-trigger option
changes; the server warms it in a thread at start and after each re-scan, so the page's first visit finds it.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

from ..errors import LorakitError
from ..library.listing import entry_dict, fit
from .guards import safe_json

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger("lorakit.server")


class Listing:
    """The encoded full list (no search), for one scan, model and option state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while the full list is built: a second caller waits for it
        self._entries: object = None
        self._key: tuple[Any, ...] = ()
        self._body = b""

    def get(self, state: ServerState, base: str | None, search: str | None) -> bytes:
        auto = bool(state.options.get("lorakit_auto_trigger_words"))
        if search is not None:
            return safe_json(reply(state, base, search, auto))
        with self._lock:
            entries = state.library.entries  # a new list after each scan
            key = (state.title, state.model.arch, base or None, auto)
            if self._entries is not entries or self._key != key:
                self._body = safe_json(reply(state, base, None, auto))
                self._entries, self._key = entries, key
            return self._body


def reply(state: ServerState, base: str | None, search: str | None, auto: bool) -> dict[str, Any]:
    """The LoRAs matching ``base`` and ``search``, each with its fit to the running model and the name a prompt
    should use (the sub-path where two files share a stem)."""
    entries = state.library.search(base or None, search)
    stems = Counter(e.name.lower() for e in state.library.entries)
    out = []
    for e in entries:
        item = entry_dict(e)
        item.update(fit(e, state.model.arch), prompt_name=e.name if stems[e.name.lower()] == 1 else e.subpath,
                    preview_url=f"/lorakit/v1/loras/{e.id}/preview" if item["preview"] else None)
        out.append(item)
    return {"model": model_info(state), "loras": out, "auto_trigger_words": auto}


def model_info(state: ServerState) -> dict[str, Any]:
    """The running model: its title, base and native size (the page's default width and height)."""
    return {"title": state.title, "arch": state.model.arch, "native_size": state.model.native_size}


def warm_listing(state: ServerState) -> None:
    """Build the full list in a background thread (nothing is lost if it fails: the next request builds it)."""
    def build() -> None:
        try:
            state.listing.get(state, None, None)
        except Exception as e:  # a warm-up must never take the server down
            log.warning(f"the LoRA list could not be prepared ahead ({type(e).__name__}: {e})")

    threading.Thread(target=build, name="lorakit-listing", daemon=True).start()


def add_library_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/lorakit/v1/loras")
    def library(base: str | None = None, search: str | None = None) -> Response:
        return Response(state.listing.get(state, base, search), media_type="application/json")

    @app.get("/lorakit/v1/model")
    def model() -> dict[str, Any]:
        return model_info(state)

    @app.get("/lorakit/v1/loras/{entry_id}/preview")
    def preview(entry_id: str) -> FileResponse:
        e = state.library.by_id(entry_id)
        if not e.sidecars.preview:
            raise LorakitError(f"{e.subpath}: no preview image")
        return FileResponse(e.path.parent / e.sidecars.preview)

    @app.post("/lorakit/v1/refresh")
    def refresh() -> dict[str, float | int]:
        """The scan's counts (ints) and ``seconds``."""
        counts = {k: v if k == "seconds" else int(v) for k, v in state.library.refresh().items()}
        warm_listing(state)
        return counts
