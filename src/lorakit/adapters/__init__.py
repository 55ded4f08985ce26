"""Network types: one small class each behind ``Adapter``; ``build_adapter`` picks one for a layer's keys."""
from __future__ import annotations

from .base import Adapter
from .dora import DoRA
from .full import Full, Norm, SetWeight
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import OFT
from .registry import build_adapter, kind_of
from .rows import Rows, split_rows

__all__ = ["Adapter", "LoRA", "LoHa", "LoKr", "IA3", "GLoRA", "OFT", "Full", "Norm", "SetWeight", "DoRA", "Rows",
           "build_adapter", "kind_of", "split_rows"]
