"""Input expansion (FLUX.1 control LoRAs, R8): a Canny/Depth control LoRA's ``img_in`` reads twice the latent
channels (the noise and the control image's latents side by side), so the model's ``x_embedder`` is widened — its
weight zero-padded on the right to the LoRA's input width, the layer's ``in_features`` and the model config's
``in_channels`` set to match — while a set needs it, and put back exactly (the original parameter object) when no
set does. A plain LoRA on a widened layer reads the original inputs only: its ``down`` is zero-padded the same way,
which is exact. Which layers may widen is the family's data (``Family.expandable``)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..adapters import Adapter, LoRA
from ..errors import IncompatibleLora

Expansions = dict[str, int]  # canonical module path → the input width the set needs


def needed(path: str, adapter: Adapter, weight_shape: tuple[int, ...], expandable: Mapping[str, str]) -> int | None:
    """The width a layer must take for ``adapter`` (``None``: no widening), when the layer may widen."""
    if path.partition(".")[2] not in expandable or len(weight_shape) != 2:
        return None
    width = adapter.widths()[1]
    return width if width is not None and width > weight_shape[1] and width % weight_shape[1] == 0 else None


def padded(adapter: Adapter, width: int, where: str) -> Adapter:
    """``adapter`` on inputs widened to ``width`` (the added inputs read by nothing): LoRA's ``down`` zero-padded.
    Another type on a widened layer is refused (its change is not defined on the control inputs)."""
    if not isinstance(adapter, LoRA) or "lora_mid.weight" in adapter.t:
        raise IncompatibleLora(f"{where}: a {adapter.kind} layer cannot share the widened input layer with a "
                               "control LoRA (only plain LoRA layers can)")
    down = adapter.t["lora_down.weight"]
    grown = torch.cat([down, down.new_zeros(down.shape[0], width - down.shape[1], *down.shape[2:])], dim=1)
    return LoRA({**adapter.t, "lora_down.weight": grown}, where)


class _Widened:
    """One widened layer: what restore puts back."""

    def __init__(self, module: torch.nn.Module, root: torch.nn.Module, key: str, width: int) -> None:
        self.module, self.root, self.key, self.width = module, root, key, width
        weight = getattr(module, "weight")
        if not isinstance(weight, torch.nn.Parameter):
            raise IncompatibleLora(f"{type(module).__name__} has no weight to widen")
        self.weight = weight
        self.in_features = int(weight.shape[1])
        self.config_value = getattr(getattr(root, "config", None), key, None)

    def set(self, weight: torch.nn.Parameter, in_features: int, config_value: object) -> None:
        setattr(self.module, "weight", weight)
        setattr(self.module, "in_features", in_features)
        if config_value is not None:
            getattr(self.root, "register_to_config")(**{self.key: config_value})


class InputExpansion:
    """The widened layers of one model, with their original parameters and config values for exact restore."""

    def __init__(self) -> None:
        self.widened: dict[str, _Widened] = {}

    @property
    def current(self) -> Expansions:
        return {path: w.width for path, w in self.widened.items()}

    def apply(self, modules: Mapping[str, torch.nn.Module], roots: Mapping[str, torch.nn.Module],
              expansions: Expansions, expandable: Mapping[str, str]) -> None:
        """Widen exactly the layers ``expansions`` names (any other widening put back first)."""
        if expansions == self.current:
            return
        self.restore()
        for path, width in expansions.items():
            component, _, inner = path.partition(".")
            entry = _Widened(modules[path], roots[component], expandable[inner], width)
            weight = entry.weight.detach()
            grown = torch.cat([weight, weight.new_zeros(weight.shape[0], width - weight.shape[1])], dim=1)
            self.widened[path] = entry
            # in_channels scales with the layer's inputs (64 → 128 at full size)
            value = None if entry.config_value is None else int(str(entry.config_value)) * width // entry.in_features
            entry.set(torch.nn.Parameter(grown, requires_grad=entry.weight.requires_grad), width, value)
            setattr(entry.module, "lorakit_inputs", entry.in_features)  # plans keep checking the model's own width

    def restore(self) -> None:
        for path in list(self.widened):
            entry = self.widened.pop(path)
            entry.set(entry.weight, entry.in_features, entry.config_value)
            delattr(entry.module, "lorakit_inputs")
