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
    ├── WeightSpecError          a malformed weight / block-weight specification
    ├── PromptSyntaxError        a malformed LoRA tag in a prompt (names the column, shows the spot)
    ├── LoraNameError            a LoRA name that matches no file (closest names listed), or several
    ├── NonFiniteOutput          NaN/inf appeared while generating (says where); no image is returned
    ├── ToolError                merge/bake/extract/resize/convert cannot do what was asked (names what)
    ├── DeviceError              a device or dtype that is unknown or not on this machine (lists what is)
    ├── GridError                an XY-grid axis or block analysis that cannot be run (names the axis)
    ├── BatchError               a batch job file or run that cannot be used (names the file and line)
    ├── ImageInputError          an init image, mask or PNG that cannot be used (names the field and why)
    ├── OutputError              an output path that cannot be written: a device, FIFO, socket or folder (never
    │                            replaced), a folder that cannot be made, no permission or space (names the path)
    ├── TrainingError            ``lorakit train`` cannot run as asked (names the flag or the checkpoint)
    │   └── TrainDataError       a training folder that cannot be used (names the folder or the images)
    └── ModelError               a base model that cannot be loaded (names the path and the problem)
        └── CheckpointError      a single file that is not a usable SD checkpoint

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


class PromptSyntaxError(LorakitError):
    """A malformed LoRA tag; ``column`` is 1-based in the text that was parsed. The message shows at most
    ``2 × CONTEXT`` characters of the text around the column, with a caret under it."""

    CONTEXT = 40

    def __init__(self, text: str, column: int, problem: str) -> None:
        self.column = column
        lo = max(0, min(column - 1 - self.CONTEXT, len(text) - 2 * self.CONTEXT))
        hi = min(len(text), lo + 2 * self.CONTEXT)
        excerpt = text[lo:hi].translate({9: " ", 10: " ", 13: " "})  # one line, so the caret lines up
        excerpt = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in excerpt)  # printable, same width
        shown = ("…" if lo else "") + excerpt + ("…" if hi < len(text) else "")
        pointer = " " * (column - 1 - lo + (1 if lo else 0)) + "^"
        super().__init__(f"prompt, column {column}: {problem}\n  {shown}\n  {pointer}")


class DeviceError(LorakitError):
    """A device or dtype that is unknown or not available here; the message lists what is available."""


class ImageInputError(LorakitError):
    """An image given as input (img2img's init image or mask, a PNG to read) that cannot be used."""


class ModelError(LorakitError):
    """A base model that cannot be loaded (names the path and the problem)."""


class CheckpointError(ModelError):
    """A file that is not a usable Stable Diffusion checkpoint (names the file and why)."""


class LoraNameError(LorakitError):
    """A LoRA name that matches no file in the LoRA folders, or several."""


class NonFiniteOutput(LorakitError):
    """NaN or inf appeared during a generation (latents at a step, or the decoded image); no image is returned."""


class ToolError(LorakitError):
    """A LoRA tool (merge, bake, extract, resize, convert) cannot do what was asked: a type the target format
    cannot express, an output that would overwrite an input, a missing option; the message names what."""


class OutputError(LorakitError):
    """An output that cannot be written where asked: the path is a device, FIFO, socket or folder (or a symlink to
    one) — refused, never replaced — or its folder cannot be made, or the write fails (no permission, no space);
    the message names the path and the reason."""


class GridError(LorakitError):
    """An XY-grid axis or a block analysis that cannot be run: bad axis syntax, an unknown axis, a range that is
    too long; the message names the axis and what was expected."""


class BatchError(LorakitError):
    """A batch that cannot run: a jobs-file line that is not a request (names the file and line), an unusable
    output folder, or ``--ray`` without Ray installed (says how to install it)."""


class TrainingError(LorakitError):
    """``lorakit train`` cannot run as asked: a flag, the model or a checkpoint (names which)."""


class TrainDataError(TrainingError):
    """A training data folder that cannot be used: empty, no captions and no trigger, unreadable images."""


class NotAMatch(Exception):
    """Internal: a dialect reader does not recognise a state dict."""
