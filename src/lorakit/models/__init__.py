"""Base models: the embedded demo model, diffusers folders and A1111 single files (offline), with the shipped
configs of every supported architecture."""
from __future__ import annotations

from ..errors import ModelError
from .loading import (
    BaseModel,
    demo_components,
    demo_model,
    load_model,
    load_single_file,
    place_model,
)

__all__ = ["BaseModel", "ModelError", "demo_components", "demo_model", "load_model", "load_single_file",
           "place_model"]
