"""What a running server holds: the model (switchable), the library, the generation queue, A1111's options
(checked, persisted)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError

from ..generate.pipeline import Generator
from ..library import EmbeddingIndex, Library
from ..models.loading import BaseModel, load_model
from . import a1111
from .library_routes import Listing
from .models import ModelCatalog, ModelEntry, load_options, save_options
from .worker import GenerationQueue

log = logging.getLogger("lorakit.server")
Loader = Callable[[str | None], BaseModel]


class ServerState:
    def __init__(self, model: BaseModel, library: Library, embeddings: EmbeddingIndex | None,
                 auto_triggers: bool, max_batch: int = 1, batch_window_ms: float = 50.0,
                 catalog: ModelCatalog | None = None, options_file: Path | None = None,
                 loader: Loader | None = None) -> None:
        self.model, self.library, self.embeddings = model, library, embeddings
        model.pipe.set_progress_bar_config(disable=True)  # progress goes to /sdapi/v1/progress, not the console
        self.queue = GenerationQueue(Generator(model, library, embeddings), max_batch, batch_window_ms)
        self.catalog = catalog or ModelCatalog([], ModelEntry(model.name, model.name, None))
        self.options_file = options_file
        self.listing = Listing()  # the page's LoRA list, encoded once per scan
        self.loader: Loader = loader or (lambda spec: load_model(spec, device=model.device, dtype=model.dtype,
                                                                 vram=model.vram))
        self.options: dict[str, Any] = {"samples_format": "png", "CLIP_stop_at_last_layers": 1,
                                        "lorakit_auto_trigger_words": auto_triggers}
        self._restore_saved()
        self._set_title()

    @property
    def title(self) -> str:
        return str(self.options["sd_model_checkpoint"])

    @property
    def clip_layers(self) -> int:
        return self.queue.generator.family.clip_layers

    def _set_title(self) -> None:
        self.options["sd_model_checkpoint"] = self.catalog.current.a1111(self.model.hash)["title"]
        self.options["sd_checkpoint_hash"] = self.model.hash

    def _restore_saved(self) -> None:
        """The options saved by an earlier run (the model is chosen before: ``saved_model``); a saved value that no
        longer passes its check is dropped with a warning."""
        saved = {k: v for k, v in load_options(self.options_file).items() if k != "sd_model_checkpoint"}
        for key, value in saved.items():
            try:
                self.options.update(a1111.checked_options({key: value}, self.clip_layers, ("saved",)))
            except RequestValidationError:
                log.warning(f"{self.options_file}: saved option {str(key)[:80]}={repr(value)[:80]} no longer valid; "
                            "ignored")

    def set_options(self, values: dict[str, Any]) -> None:
        """Check every value first (a bad one is a 422 and changes nothing), switch the model if another is named
        (on the worker, between jobs; a model that fails to load leaves the running one), then store and save."""
        checked = a1111.checked_options(values, self.clip_layers, ("body",))
        name = values.get("sd_model_checkpoint")
        if name is not None and not isinstance(name, str):
            raise RequestValidationError([{"type": "value_error", "loc": ("body", "sd_model_checkpoint"),
                                           "msg": "must be a model title (GET /sdapi/v1/sd-models)", "input": name}])
        if name is not None:
            entry = self.catalog.find(name)
            if entry.title != self.catalog.current.title:
                self.queue.submit(lambda: self._switch(entry)).result()
        self.options.update(checked)
        save_options(self.options_file, {k: v for k, v in self.options.items() if k != "sd_checkpoint_hash"})

    def _switch(self, entry: ModelEntry) -> None:
        """Load ``entry`` (on the worker thread: no job runs meanwhile), then drop the old model."""
        log.info(f"switching model: {self.catalog.current.title} → {entry.title}")
        new = self.loader(entry.spec)  # raises ModelError; the old model is still in place
        new.pipe.set_progress_bar_config(disable=True)
        old = self.queue.generator
        generator = Generator(new, self.library, self.embeddings)
        generator.lora_mode = old.lora_mode
        old.close()  # the old model's weights back (it may be loaded again later from disk)
        self.queue.replace_generator(generator)
        if self.catalog.current.spec is None and self.catalog.current.title != "demo":
            self.catalog.entries = [e for e in self.catalog.entries if e != self.catalog.current]  # cannot reload
        self.model, self.catalog.current = new, entry
        self._set_title()
        log.info(f"model {new.describe()}")


def saved_model(options_file: Path | None, catalog: ModelCatalog) -> ModelEntry | None:
    """The model saved in the options file, if it is still in the catalog."""
    name = load_options(options_file).get("sd_model_checkpoint")
    if not isinstance(name, str):
        return None
    try:
        return catalog.find(name)
    except Exception:
        log.warning(f"{options_file}: saved model {name[:200]!r} is no longer available; using the default")
        return None
