"""Folders of LoRA files: finding a LoRA by the name a prompt uses. No torch import here."""
from .names import LoraIndex, LoraNameError, lora_dirs_from_env

__all__ = ["LoraIndex", "LoraNameError", "lora_dirs_from_env"]
