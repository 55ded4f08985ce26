"""What the ingress's routes see instead of one process's ``ServerState``: the same attributes, but the model, the
options and progress are the cluster's (read from the job table at each use, so every ingress replica answers
alike), and jobs go to the model replicas (``queue.ClusterQueue``).

- ``/options``: values are checked as alone; a model switch is first made on one replica (a model that does not
  load is the same 422 and changes nothing), then recorded in the job table. From then on every job carries the
  new model — a replica still on the old one switches before running it — and each replica switches on its own
  between jobs within a second (the rolling switch): no request runs on a half-switched replica, and no request
  accepted after the switch runs on the old model.
- ``/refresh-loras``: the ingress re-scans the shared folder and bumps the library's epoch; each replica re-scans.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError

from ..library import Library
from ..server import a1111
from ..server.library_routes import Listing
from ..server.models import ModelCatalog, ModelEntry
from .config import ClusterConfig
from .keys import NO_LORAS, routing_id
from .queue import ClusterQueue, call, unwrapped


@dataclass(frozen=True)
class ModelView:
    """The cluster's model as the routes use it (``state.model``)."""

    name: str
    hash: str
    arch: Any


class SharedLibrary(Library):
    """The LoRA folder every replica reads; a re-scan here tells every replica to re-scan."""

    on_refresh: Any = None

    def refresh(self) -> dict[str, float]:
        counts = super().refresh()
        if self.on_refresh is not None:
            self.on_refresh()
        return counts


class ClusterState:
    def __init__(self, cfg: ClusterConfig, model: Any, table: Any) -> None:
        self.cfg, self.table, self.model_handle = cfg, table, model
        self.library = SharedLibrary(cfg.lora_dirs, index=cfg.library_index)
        self.library.on_refresh = lambda: call(table.refresh_library.remote())
        self.embeddings = None
        self.queue = ClusterQueue(cfg, model, table, lambda name: self.library.resolve(name).subpath)
        self.listing = Listing()
        self.options_file = None
        view = self._view()["model"]
        self._catalog = ModelCatalog([Path(d) for d in cfg.models_dirs], _entry(view))

    def _view(self) -> dict[str, Any]:
        return dict(call(self.table.view.remote()))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._view()["options"])

    @property
    def model(self) -> ModelView:
        m = self._view()["model"]
        return ModelView(m["name"], m["hash"], m["arch"])

    @property
    def title(self) -> str:
        return str(self.options["sd_model_checkpoint"])

    @property
    def clip_layers(self) -> int:
        return int(self._view()["model"]["clip_layers"])

    @property
    def catalog(self) -> ModelCatalog:
        current = _entry(self._view()["model"])
        if current != self._catalog.current:
            self._catalog.current = current
            self._catalog.refresh()
        return self._catalog

    def set_options(self, values: dict[str, Any]) -> None:
        """Check every value (a bad one is a 422 and changes nothing), switch the cluster's model if another is
        named (made on one replica first: one that fails to load leaves the cluster as it was), then store."""
        view = self._view()
        checked = a1111.checked_options(values, int(view["model"]["clip_layers"]), ("body",))
        name = values.get("sd_model_checkpoint")
        if name is not None and not isinstance(name, str):
            raise RequestValidationError([{"type": "value_error", "loc": ("body", "sd_model_checkpoint"),
                                           "msg": "must be a model title (GET /sdapi/v1/sd-models)", "input": name}])
        if name is not None:
            entry = self._find(name)
            if entry.title != view["model"]["entry_title"]:
                target = {"entry_title": entry.title, "entry_name": entry.name, "spec": entry.spec}
                handle = self.model_handle.options(multiplexed_model_id=routing_id(entry.title, NO_LORAS))
                try:
                    info = handle.switch_model.remote(target).result(timeout_s=self.cfg.request_timeout_s)
                except Exception as e:
                    raise unwrapped(e) from None
                call(self.table.set_model.remote(info))
        call(self.table.set_options.remote(checked))

    def _find(self, name: str) -> ModelEntry:
        catalog = self.catalog
        try:
            return catalog.find(name)
        except Exception:
            catalog.refresh()  # another ingress replica may have been told of new files
            return catalog.find(name)


def _entry(model: dict[str, Any]) -> ModelEntry:
    return ModelEntry(model["entry_title"], model["entry_name"], model["spec"])
