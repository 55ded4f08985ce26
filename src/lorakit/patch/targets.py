"""What LoRAs are applied to: a diffusers pipeline or a mapping of components, and how canonical paths resolve to
its modules."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import LorakitError
from ..keymap.arch import CROSS_DIM, SDXL, TE_WIDTH, UNKNOWN, Arch
from ..keymap.families import family_of_model

from ..adapters.functional import is_rms_norm

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
SUPPORTED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def supported(module: torch.nn.Module) -> bool:
    """Whether LoRAs can change this module: Linear, Conv2d, GroupNorm, LayerNorm, RMSNorm (FLUX's q/k norms)."""
    return isinstance(module, SUPPORTED) or is_rms_norm(module)


def components_of(target: object) -> dict[str, torch.nn.Module]:
    """``{"unet": m, "text_encoder": m, "text_encoder_2": m}`` from a pipeline or a mapping (missing ones omitted)."""
    if isinstance(target, Mapping):
        items = {k: v for k, v in target.items() if v is not None}
    else:
        items = {k: getattr(target, k, None) for k in COMPONENTS}
        items = {k: v for k, v in items.items() if v is not None}
    unknown = set(items) - set(COMPONENTS)
    if unknown:
        raise LorakitError(f"unknown component(s) {sorted(unknown)}; expected {', '.join(COMPONENTS)}")
    bad = [k for k, v in items.items() if not isinstance(v, torch.nn.Module)]
    if bad or not items:
        raise LorakitError("apply_loras needs a diffusers pipeline or a mapping of torch modules "
                           f"({', '.join(COMPONENTS)}); got {type(target).__name__}")
    return items


def find_module(components: Mapping[str, torch.nn.Module], canonical_path: str) -> torch.nn.Module | None:
    """The module at ``component.path``; text-encoder paths also tried under ``text_model.``."""
    component, _, path = canonical_path.partition(".")
    root = components.get(component)
    if root is None:
        return None
    for candidate in (path, f"text_model.{path}") if component.startswith("text_encoder") else (path,):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def model_arch(components: Mapping[str, torch.nn.Module]) -> str:
    """A transformer family (FLUX.1) from its classes, its size where it has several (SD3: ``Family.sizes``);
    SD1/SD2/SDXL from the UNet's cross-attention width, else the
    text encoder's; a model that names its architecture (the demo model's components carry ``lorakit_arch``) is
    taken at its word."""
    for module in components.values():
        named = getattr(module, "lorakit_arch", None)
        if isinstance(named, str):
            return Arch(named)
    family = family_of_model(components)
    if family is not None and family.arch is not None:
        return family.arch
    if family is not None and family.sizes is not None:
        return family.sizes.of_model(components)
    unet = components.get("unet")
    cross = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if cross in CROSS_DIM or "text_encoder_2" in components:
        return CROSS_DIM.get(int(cross or 0), SDXL) if "text_encoder_2" not in components else SDXL
    te = components.get("text_encoder")
    hidden = getattr(getattr(te, "config", None), "hidden_size", None)
    return TE_WIDTH.get(hidden, UNKNOWN) if isinstance(hidden, int) else UNKNOWN
