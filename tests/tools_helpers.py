"""Helpers of the tool tests: LyCORIS-written kohya files on tiny models, and ΔW of a layer as lorakit applies it."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lorakit.files.io import save_file
from lorakit.lora_model import LoraModel
from lorakit.patch.targets import find_module

from .lyco import file_state_dict, make_network


def lyco_file(components: Mapping[str, torch.nn.Module], path: Path, algo: str, seed: int = 0,
              te: bool = True, metadata: dict[str, str] | None = None, **kwargs: object) -> Path:
    """A kohya-named file written from LyCORIS networks on the UNet (and the text encoder)."""
    sd = file_state_dict(make_network(components["unet"], algo, seed=seed, **kwargs), ("lycoris_", "lora_unet_"))
    if te:
        net = make_network(components["text_encoder"], algo, seed=seed + 100, **kwargs)
        sd.update(file_state_dict(net, ("lycoris_", "lora_te_")))
    save_file(sd, path, metadata)
    return path


def weight_of(components: Mapping[str, torch.nn.Module], path: str) -> torch.Tensor:
    module = find_module(components, path)
    assert module is not None, path
    return module.weight.detach().float()


def delta(lora: LoraModel, path: str, components: Mapping[str, torch.nn.Module], strength: float = 1.0) \
        -> torch.Tensor:
    """ΔW that ``apply_loras`` adds for one layer of ``lora`` at ``strength`` (fp32)."""
    w = weight_of(components, path)
    return lora.layers[path].delta(w, strength).double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
