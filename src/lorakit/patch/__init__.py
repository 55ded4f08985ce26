"""Applying LoRAs to a model: ``apply_loras(target, [(lora, weight), ...])``.

One ``Patcher`` per model holds its LoRA state, so successive calls switch sets by re-patching only what changes.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Union

import torch

from ..errors import LorakitError
from ..lora_model import LoraLike, LoraModel, load_cached
from .fused import FusedPatcher
from .hooks import HookPatcher
from ..quant.layers import weight_shape, weight_values
from .placement import place_loras
from ..keymap.families import family_of_model
from .expand import InputExpansion
from .quantized import QuantizedPatcher, Requantized
from .plan import Contribution, LoraReport, Plan, PlanCache, ResolutionCache, build_plan
from .targets import components_of, find_module, model_arch
from .weights import Weight, as_weight

log = logging.getLogger("lorakit")

WeightLike = Union[float, int, Mapping[str, object], Weight]
MODES = ("fused", "hooks", "requant")  # requant: quantized layers requantized (lossy, reported), the rest fused


class Patcher:
    """The LoRA state of one model (its unet / text encoders)."""

    def __init__(self, components: Mapping[str, torch.nn.Module]) -> None:
        self.components = dict(components)
        self.fused = FusedPatcher()
        self.hooks = HookPatcher()
        self.quantized = QuantizedPatcher()  # quantized layers: merged per forward, never written
        self.expansion = InputExpansion()  # input layers widened for control LoRAs
        self.requantized = Requantized()  # mode "requant": the lossy opt-in, each layer's loss reported
        self._quantized: frozenset[str] = frozenset()
        self._mode = "fused"  # of the last set: a per-step update in fused mode is a set
        self.reports: list[LoraReport] = []
        self._active: list[tuple[LoraModel, list[str]]] = []  # the last set: each LoRA and its layers that fit
        self._modules: dict[str, torch.nn.Module] = {}
        self._resolved = ResolutionCache()  # module lookups and shape checks, once per LoRA on this model
        self._plans = PlanCache()  # the plans of recent sets: switching back to one rebuilds nothing

    def set(self, loras: Sequence[tuple[LoraLike, WeightLike]] | Iterable[tuple[LoraLike, WeightLike]], *,
            mode: str = "fused", strict: bool = False, log_reports: bool = True) -> list[LoraReport]:
        """Make exactly ``loras`` active. Everything is checked first; on any error the model is left as it was
        before the call's first change (all originals back). Logs one line per LoRA unless ``log_reports`` is
        false (per-step strength updates)."""
        if mode not in MODES:
            raise LorakitError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        resolved = [(load_cached(lora, strict=strict), as_weight(w)) for lora, w in loras]
        host = mode == "fused" and self.fused.originals_mode == "host"  # the low-memory choice: factors stay off the card
        resolved = place_loras(resolved, self.components, mode, host)  # factors on the weights' device, fp32, cached
        plan = self._plans.get(resolved, strict)
        if plan is None:
            plan = self._plans.put(resolved, strict, build_plan(self.components, resolved, strict, self._resolved,
                                                                self._original))
        try:
            self._expand(plan)
            if mode in ("fused", "requant"):
                self.hooks.restore()
                self.fused.apply(plan)
                quantized = {p: c for p, c in plan.layers.items() if p in plan.quantized}
                if mode == "requant":
                    self.quantized.restore()
                    self.requantized.apply(plan.modules, quantized)
                    self._log_requant()
                else:
                    self.requantized.restore()
                    self.quantized.apply(plan.modules, quantized)
            else:
                self.requantized.restore()
                self.fused.restore()
                self._apply_hooks(plan)
        except BaseException:
            self.restore()
            raise
        self.reports = plan.reports
        self._modules = plan.modules
        self._quantized = plan.quantized
        self._mode = mode
        self._active = [(lora, [p for p in lora.layers if p in plan.modules]) for lora, _ in resolved]
        for report in plan.reports if log_reports else []:
            log.info(report.line())
        return plan.reports

    def update(self, weights: Sequence[WeightLike]) -> None:
        """New strengths for the LoRAs of the last ``set`` (same order), in hooks mode without resolving or
        checking anything again: the per-step path of strength schedules. In fused mode this is a ``set``."""
        if len(weights) != len(self._active):
            raise LorakitError(f"update needs one weight per active LoRA ({len(self._active)}), got {len(weights)}")
        if self._mode in ("fused", "requant"):
            self.set([(lora, w) for (lora, _), w in zip(self._active, weights)], mode=self._mode, log_reports=False)
            return
        arch = model_arch(self.components)
        layers: dict[str, list[Contribution]] = {}
        for (lora, paths), spec in zip(self._active, weights):
            weight = as_weight(spec)
            for path in paths:
                strength = weight.for_path(path, arch)
                if strength != 0.0:
                    layers.setdefault(path, []).append(Contribution(lora.layers[path], strength, weight.dyn))
        try:
            self._apply_hooks(Plan(self._modules, layers, self.reports, self._quantized))
        except BaseException:
            self.restore()
            raise

    def _log_requant(self) -> None:
        report = self.requantized.report
        if report:
            worst = min(report.items(), key=lambda kv: kv[1][0])
            mean = sum(k for k, _ in report.values()) / len(report)
            log.warning(f"requantized {len(report)} quantized layers (lossy): the LoRA change kept {mean:.3f} on "
                        f"average, worst {worst[1][0]:.3f} ({worst[0]}); mode fused keeps all of it exactly")

    def _expand(self, plan: Plan) -> None:
        """Widen (or put back) the input layers a control LoRA needs; every change is restored first, as the widened
        layer gets a new parameter."""
        if plan.expansions == self.expansion.current:
            return
        self.fused.restore()
        self.hooks.restore()
        self.quantized.restore()
        family = family_of_model(self.components)
        self.expansion.apply(plan.modules, self.components, plan.expansions, family.expandable if family else {})

    def _apply_hooks(self, plan: Plan) -> None:
        """Hooks on every layer, but on a quantized layer only when every change is a side branch (LoRA/LoCon);
        a quantized layer with another type merges per forward (``patch/quantized.py``)."""
        merged = {p for p in plan.quantized if any(not c.adapter.bypass for c in plan.layers.get(p, []))}
        self.hooks.apply(Plan(plan.modules, {p: c for p, c in plan.layers.items() if p not in merged}, plan.reports))
        self.quantized.apply(plan.modules, {p: plan.layers[p] for p in merged})

    def _original(self, path: str) -> torch.Tensor:
        """A module's original weight, whether patched now (kept by the fused patcher) or not."""
        kept = self.fused.original((path, "weight"))
        if kept is not None:
            return kept
        module = find_module(self.components, path)
        if module is None or weight_shape(module) is None:
            raise LorakitError(f"{path}: a part of a fused layer the LoRA changes is not in this model")
        return weight_values(module)  # a quantized layer's dequantized weight (its storage is never patched)

    @property
    def originals_location(self) -> str:
        """Where the originals of the fused weights are kept: ``device``, ``host``, ``device+host`` or ``none``."""
        return self.fused.originals_location

    def restore(self) -> None:
        """Every parameter back to its original tensor (bit-exact); every hook removed."""
        self.fused.restore()
        self.hooks.restore()
        self.quantized.restore()
        self.requantized.restore()
        self.expansion.restore()
        self._plans.clear()
        self.reports = []
        self._active, self._modules = [], {}


_PATCHERS: "weakref.WeakKeyDictionary[torch.nn.Module, Patcher]" = weakref.WeakKeyDictionary()


def patcher_for(target: object) -> Patcher:
    """The one ``Patcher`` of a model (created on first use, keyed by its first component module)."""
    components = components_of(target)
    key = next(iter(components.values()))
    patcher = _PATCHERS.get(key)
    if patcher is None or patcher.components != components:
        patcher = Patcher(components)
        _PATCHERS[key] = patcher
    return patcher


class AppliedLoras:
    """What ``apply_loras`` returns: the reports, and a context manager that restores on exit."""

    def __init__(self, patcher: Patcher, reports: list[LoraReport]) -> None:
        self.patcher = patcher
        self.reports = reports

    def restore(self) -> None:
        self.patcher.restore()

    def __enter__(self) -> "AppliedLoras":
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.patcher.restore()


def apply_loras(target: object, loras: Sequence[tuple[LoraLike, WeightLike] | LoraLike], *, mode: str = "fused",
                strict: bool = False) -> AppliedLoras:
    """Apply LoRAs to a diffusers pipeline or ``{"unet": m, "text_encoder": m, "text_encoder_2": m}``.

    ``loras``: ``(LoraModel | path, weight)`` pairs (a bare LoraModel/path means weight 1). Use as a context
    manager to restore on exit, or call again with another set to switch (only changed parameters are
    re-patched), and ``restore(target)`` to remove all."""
    pairs = [item if isinstance(item, tuple) else (item, 1.0) for item in loras]
    patcher = patcher_for(target)
    return AppliedLoras(patcher, patcher.set(pairs, mode=mode, strict=strict))


def restore(target: object) -> None:
    """Remove every LoRA applied to ``target`` by lorakit."""
    patcher_for(target).restore()
