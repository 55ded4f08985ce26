"""lorakit: LoRA support for Stable Diffusion — every file format, applied exactly, restored bit-exactly.

    import lorakit
    lora = lorakit.load_lora("file.safetensors")
    with lorakit.apply_loras(pipe, [(lora, 0.8), ("other.safetensors", 1.0)]):
        image = pipe(prompt).images[0]

The public names load lazily (PEP 562), so torch-free parts (``lorakit.library``, ``lorakit.prompt``) import
without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    IncompatibleLora,
    InvalidLora,
    LoraFileError,
    LorakitError,
    UnmatchedKeys,
    UnreadableFile,
    UnsafePickle,
    UnsupportedLora,
    WeightSpecError,
)

__version__ = "0.1.0"

_LAZY = {
    "load_lora": "lora_model", "lora_from_state_dict": "lora_model", "LoraModel": "lora_model",
    "apply_loras": "patch", "restore": "patch", "patcher_for": "patch", "Patcher": "patch",
    "AppliedLoras": "patch", "LoraReport": "patch.plan", "Weight": "patch.weights", "as_weight": "patch.weights",
    "PRESETS": "patch.weights",
}

__all__ = [
    *_LAZY,
    "LorakitError", "LoraFileError", "UnreadableFile", "UnsafePickle", "InvalidLora", "UnsupportedLora",
    "UnmatchedKeys", "IncompatibleLora", "WeightSpecError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)  # submodules: lorakit.io, lorakit.hashes, …
        except ModuleNotFoundError:
            raise AttributeError(f"module 'lorakit' has no attribute {name!r}") from None
    globals()[name] = value
    return value
