"""Pick the adapter class for one layer's keys (a plain ordered list, first match wins)."""
from __future__ import annotations

import torch

from .base import Adapter
from .dora import DoRA
from .full import Full, Norm, SetWeight
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import OFT

ADAPTERS: list[type[Adapter]] = [LoRA, LoHa, LoKr, OFT, GLoRA, IA3, Full, Norm, SetWeight]
DORA_WRAPPABLE = (LoRA, LoHa, LoKr)


def build_adapter(group: dict[str, torch.Tensor], where: str) -> tuple[Adapter | None, list[str]]:
    """The adapter for one layer and the leaf keys nobody consumed (``None`` when no type matches). Raises
    ``InvalidLora`` when the layer's tensors contradict each other."""
    for cls in ADAPTERS:
        if any(k in group for k in cls.detect):
            used = {k: v for k, v in group.items() if k in cls.keys}
            adapter: Adapter = cls(used, where)
            rest = [k for k in group if k not in cls.keys]
            if "dora_scale" in rest and isinstance(adapter, DORA_WRAPPABLE):
                adapter = DoRA(adapter, group["dora_scale"], where)
                rest.remove("dora_scale")
            return adapter, rest
    return None, list(group)


def kind_of(adapter: Adapter) -> str:
    return str(getattr(adapter, "kind_name", adapter.kind))
