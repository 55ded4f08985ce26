"""Helpers to make LoRA files with the reference implementation (``lycoris-lora``) and read its merged weights."""
from __future__ import annotations

import logging

import lycoris.logging as lycoris_logging
import torch
from lycoris import DyLoraModule, FullModule, LohaModule, LokrModule, create_lycoris

lycoris_logging.logger.setLevel(logging.ERROR)


def make_network(root: torch.nn.Module, algo: str, seed: int = 0, **kwargs: object) -> object:
    """A LyCORIS network on ``root`` with non-zero random weights (the reference initialises ``up`` to 0)."""
    net = create_lycoris(root, 1.0, **kwargs, algo=algo)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras:
            if isinstance(lora, FullModule):
                lora.is_diff = False  # the trained state: ``weight`` is the whole layer, ``diff`` = weight − org
            for name, p in lora.named_parameters():
                if name == "dora_scale":
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
                elif "oft_blocks" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
                elif isinstance(lora, FullModule):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


def file_state_dict(net: object, rename: tuple[str, str] | None = None) -> dict[str, torch.Tensor]:
    """What ``save_weights`` would write: every module's own state dict under ``<lora_name>.``."""
    out: dict[str, torch.Tensor] = {}
    for lora in net.loras:  # type: ignore[attr-defined]
        name = lora.lora_name
        if rename:
            name = name.replace(rename[0], rename[1], 1)
        for k, v in lora.state_dict().items():
            out[f"{name}.{k}"] = v.detach().clone().contiguous()
    return out


def merged_weights(net: object, multiplier: float = 1.0) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """LyCORIS's own merged (weight, bias) per module, keyed by LyCORIS lora name.

    Two exceptions, both where LyCORIS 4.1.3's merge helper disagrees with its own training forward:
    LoHa/LoKr ``get_diff_weight`` applies α/r twice (``get_weight`` already scales by it), so for them the
    reference is the weight its forward uses, ``W + get_weight(shape)·m``. DyLoRA trains with a moving scale
    α/(blocks+1) and merges a random rank; its saved file is a plain LoRA (α, up, down) that kohya, A1111 and
    ComfyUI read with α/r at full rank, so that is the reference."""
    out = {}
    with torch.no_grad():
        for lora in net.loras:  # type: ignore[attr-defined]
            shape = lora.org_module[0].weight.shape
            if isinstance(lora, (LohaModule, LokrModule)) and not lora.wd:
                w, b = lora.org_weight + lora.get_weight(shape) * multiplier, None
            elif isinstance(lora, DyLoraModule):
                down, up, _ = lora.get_weight(lora.lora_dim)
                scale = float(lora.alpha) / lora.lora_dim * multiplier
                w, b = lora.org_weight + (up @ down).view(shape) * scale, None
            else:
                w, b = lora.get_merged_weight(multiplier=multiplier, shape=shape, device=torch.device("cpu"))
            out[lora.lora_name] = (w.detach().clone(), None if b is None else b.detach().clone())
    return out
