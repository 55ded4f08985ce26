"""Several LoRA sets in one batch: every sample gets the output change of its own set through forward hooks (the
per-request low-rank terms of multi-LoRA LLM servers); no weight is modified.

``MultiPatcher(components).set(sets, samples)``: ``sets[k]`` is a list of ``(LoRA, weight)`` pairs (empty: the
base model), ``samples[i]`` the set of the batch's i-th sample. A forward whose batch has ``B = n·S`` rows
(``S = len(samples)``; n = 2 under classifier-free guidance, where diffusers concatenates ``[uncond…, cond…]``)
gives row r the set ``samples[r mod S]``. For each hooked layer and each set that changes it, in the set's order::

    y[rows_k] += hook_output_c(x[rows_k])     for each contribution c of set k      (index_select → index_add)

— the same contributions, computed on the same rows, added in the same order as a sample running alone in hooks
mode (``Patcher.set(..., mode="hooks")``): LoRA/LoCon as ``s·up(down(x))``, the other types as ``op(x, ΔW, Δb)``
with ΔW cached per strength. Every set is checked (``build_plan``) before the first hook is registered. Every
hooked layer must see the batch (the UNet); text encoders that run one prompt at a time get their LoRAs per prompt
(``Patcher``), with a ``te`` weight of 0 here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import torch

from ..adapters import functional as fn
from ..errors import LorakitError
from ..lora_model import LoraLike, load_cached
from .hooks import _LayerHook, _weight
from .placement import place_loras, reserve
from .plan import Contribution, Plan, ResolutionCache, build_plan
from .weights import Weight, as_weight

LoraSet = Sequence[tuple[LoraLike, Any]]  # (LoRA or path, weight spec: float, mapping or Weight)


class RowMap:
    """Which rows of a batch belong to which set: ``samples[i]`` is the set of sample i; a batch of ``n·S`` rows
    repeats that pattern n times (the CFG halves)."""

    def __init__(self, samples: Sequence[int]) -> None:
        if not samples:
            raise LorakitError("a mixed-LoRA batch needs at least one sample")
        self.samples = list(samples)
        self._rows: dict[tuple[int, torch.device], dict[int, torch.Tensor]] = {}

    def rows(self, batch: int, device: torch.device) -> dict[int, torch.Tensor]:
        """Set → its row indices (int64 on ``device``) in a batch of ``batch`` rows."""
        key = (batch, device)
        if key not in self._rows:
            s = len(self.samples)
            if batch % s:
                raise LorakitError(f"a batch of {batch} rows does not match the {s} samples of this mixed-LoRA "
                                   "batch (expected a multiple)")
            out: dict[int, list[int]] = {}
            for row in range(batch):
                out.setdefault(self.samples[row % s], []).append(row)
            self._rows[key] = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in out.items()}
        return self._rows[key]


class _RowsHook(_LayerHook):
    """One layer's hook: ``per_set`` holds (set, its contributions on this layer) for the sets that change it."""

    def __init__(self, module: torch.nn.Module, per_set: list[tuple[int, list[Contribution]]],
                 rowmap: RowMap) -> None:
        super().__init__(module, [c for _, contribs in per_set for c in contribs])
        self.per_set = per_set
        self.rowmap = rowmap

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        rows = self.rowmap.rows(x.shape[0], x.device)
        out = output.clone()  # once: the changes are then added in place (the module's output is left as it was)
        for k, contribs in self.per_set:
            idx = rows.get(k)
            if idx is None:
                continue
            whole = idx.numel() == x.shape[0]  # one set has every row: no gather/scatter
            xs = x if whole else x.index_select(0, idx)
            for c in contribs:
                change = self._change(module, xs, c)
                if whole:
                    out.add_(change)
                else:
                    out.index_add_(0, idx, change)
        return out

    def _change(self, module: torch.nn.Module, x: torch.Tensor, c: Contribution) -> torch.Tensor:
        """The output change of one contribution for the rows ``x`` (as ``_LayerHook`` computes it)."""
        if c.adapter.bypass:
            return c.adapter.hook_output(module, x, _weight(module), c.strength, c.dyn)
        d, b = self._delta(module, c, x.dtype)
        return fn.module_op(module, x, d, b)


class MultiPatcher:
    """Per-sample LoRA sets on one model's components; a context manager that removes its hooks on exit."""

    def __init__(self, components: Mapping[str, torch.nn.Module], cache: ResolutionCache | None = None) -> None:
        self.components = dict(components)
        self.hooks: dict[str, _RowsHook] = {}
        self._resolved = cache or ResolutionCache()

    def set(self, sets: Sequence[LoraSet], samples: Sequence[int], *, strict: bool = False) -> list[Plan]:
        """Hook every layer any set changes. ``samples[i]`` indexes ``sets``. Every set is resolved and checked
        first; on any error nothing is hooked (and hooks of an earlier ``set`` are removed)."""
        self.restore()
        if any(not 0 <= k < len(sets) for k in samples):
            raise LorakitError(f"sample set indices must be in 0…{len(sets) - 1}, got {sorted(set(samples))}")
        reserve(sum(len(pairs) for pairs in sets))  # every LoRA of the batch stays placed for the next batch
        plans = [self._plan(pairs, strict) for pairs in sets]
        rowmap = RowMap(samples)
        layers: dict[str, list[tuple[int, list[Contribution]]]] = {}
        modules: dict[str, torch.nn.Module] = {}
        for k, plan in enumerate(plans):
            for path, contribs in plan.layers.items():
                layers.setdefault(path, []).append((k, contribs))
                modules[path] = plan.modules[path]
        try:
            for path, per_set in layers.items():
                self.hooks[path] = _RowsHook(modules[path], per_set, rowmap)
        except BaseException:
            self.restore()
            raise
        return plans

    def _plan(self, pairs: LoraSet, strict: bool) -> Plan:
        resolved: list[tuple[Any, Weight]] = [(load_cached(lora, strict=strict), as_weight(w)) for lora, w in pairs]
        resolved = place_loras(resolved, self.components, "hooks")
        return build_plan(self.components, resolved, strict, self._resolved)

    def restore(self) -> None:
        """Remove every hook (no weight was changed)."""
        for hook in self.hooks.values():
            hook.handle.remove()
        self.hooks.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.restore()
