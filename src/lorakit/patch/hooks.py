"""Hooks mode: forward hooks add each LoRA's output change; no weight is modified.

Adapters with a ``bypass`` (LoRA/LoCon: ``m·s·up(down(x))``, cheap when the strength changes every step) give their
output change themselves; the others add ``op(x, ΔW, Δb)`` with ΔW cached per strength. Strengths can be changed
between forwards without re-registering (``apply`` with the same layers only updates them).
"""
from __future__ import annotations

from typing import Any

import torch

from ..adapters import functional as fn
from ..quant.layers import weight_values
from .plan import Contribution, Plan


class _LayerHook:
    """``cached=False`` (training: the adapters' tensors change between forwards) recomputes ΔW every forward."""

    def __init__(self, module: torch.nn.Module, contribs: list[Contribution], cached: bool = True) -> None:
        self.contribs = contribs
        self.cached = cached
        self.cache: dict[tuple[int, float, int | None, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for c in self.contribs:
            if c.adapter.bypass:
                output = output + c.adapter.hook_output(module, x, _weight(module), c.strength, c.dyn)
            else:
                d, b = self._delta(module, c, x.dtype)
                output = output + fn.module_op(module, x, d, b)
        return output

    def _delta(self, module: torch.nn.Module, c: Contribution,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (id(c.adapter), c.strength, c.dyn, dtype)
        if key in self.cache:
            return self.cache[key]
        w = weight_values(module).float()  # a quantized layer's own dequantization, never its stored bytes
        b = c.adapter.bias_delta(c.strength) if getattr(module, "bias", None) is not None else None
        made = (c.adapter.delta(w, c.strength, c.dyn).to(dtype), None if b is None else b.to(dtype))
        if self.cached:
            self.cache[key] = made
        return made


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight (plan only hooks modules that have one)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


class HookPatcher:
    def __init__(self) -> None:
        self.hooks: dict[str, _LayerHook] = {}

    def apply(self, plan: Plan) -> int:
        for path in [p for p in self.hooks if p not in plan.layers]:
            self.hooks.pop(path).handle.remove()
        for path, contribs in plan.layers.items():
            hook = self.hooks.get(path)
            if hook is None:
                self.hooks[path] = _LayerHook(plan.modules[path], contribs)
            elif hook.contribs != contribs:
                hook.contribs = contribs
                hook.cache.clear()
        return len(plan.layers)

    def restore(self) -> None:
        for hook in self.hooks.values():
            hook.handle.remove()
        self.hooks.clear()

    @property
    def active(self) -> bool:
        return bool(self.hooks)
