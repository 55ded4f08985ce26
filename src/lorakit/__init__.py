"""lorakit: LoRA support for Stable Diffusion — every file format, applied exactly, restored bit-exactly.

    import lorakit
    lora = lorakit.load_lora("file.safetensors")
    with lorakit.apply_loras(pipe, [(lora, 0.8), ("other.safetensors", 1.0)]):
        image = pipe(prompt).images[0]
"""
from __future__ import annotations

from .errors import (IncompatibleLora, InvalidLora, LoraFileError, LorakitError, UnmatchedKeys, UnreadableFile,
                     UnsafePickle, UnsupportedLora, WeightSpecError)
from .lora_model import LoraModel, load_lora, lora_from_state_dict
from .patch import AppliedLoras, Patcher, apply_loras, patcher_for, restore
from .patch.plan import LoraReport
from .patch.weights import PRESETS, Weight, as_weight

__version__ = "0.1.0"

__all__ = [
    "load_lora", "lora_from_state_dict", "LoraModel", "apply_loras", "restore", "patcher_for", "Patcher",
    "AppliedLoras", "LoraReport", "Weight", "as_weight", "PRESETS",
    "LorakitError", "LoraFileError", "UnreadableFile", "UnsafePickle", "InvalidLora", "UnsupportedLora",
    "UnmatchedKeys", "IncompatibleLora", "WeightSpecError",
]
