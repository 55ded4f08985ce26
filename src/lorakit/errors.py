"""The one exception tree of lorakit.

Every error a user can cause is a ``LorakitError``; nothing else escapes the public API on bad input::

    LorakitError
    ├── LoraFileError            a file could not be used (always names the file)
    │   ├── UnreadableFile       missing, truncated, malformed, not a tensor file
    │   ├── UnsafePickle         a pickle that needs more than plain tensors (never executed)
    │   ├── InvalidLora          ours (we recognise it), but broken: wrong shapes, missing partner keys
    │   ├── UnsupportedLora      recognised, but for a model lorakit does not support (SD3, Flux, ...)
    │   └── UnmatchedKeys        strict mode: keys that no layer consumed
    ├── IncompatibleLora         a LoRA that does not fit the model it is applied to (names both sides)
    └── WeightSpecError          a malformed weight / block-weight specification

``NotAMatch`` is internal: a dialect's ``detect`` says "not mine"; it never reaches users.
"""
from __future__ import annotations

from pathlib import Path


class LorakitError(Exception):
    """Base of every error lorakit raises on user input."""


class LoraFileError(LorakitError):
    """A problem with one file; the message always starts with the file name."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}")


class UnreadableFile(LoraFileError):
    """Missing, truncated or malformed file, or one without tensors."""


class UnsafePickle(LoraFileError):
    """A pickled file that cannot be loaded with ``weights_only=True``."""


class InvalidLora(LoraFileError):
    """A file lorakit recognises whose content is inconsistent."""


class UnsupportedLora(LoraFileError):
    """A LoRA for a model family lorakit does not apply (SD3, Flux, ...)."""


class UnmatchedKeys(LoraFileError):
    """Raised in strict mode when keys of a file were not consumed."""


class IncompatibleLora(LorakitError):
    """A LoRA that does not fit the target model; raised before any weight changes."""


class WeightSpecError(LorakitError):
    """A malformed weight specification (block weights, presets, per-part weights)."""


class NotAMatch(Exception):
    """Internal: a dialect reader does not recognise a state dict."""
