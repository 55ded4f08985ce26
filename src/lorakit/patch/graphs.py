"""A LoRA set's switch recorded once as a CUDA graph and replayed.

On a GPU a fused switch is host-bound: each weight's sum is one ``addmm`` on the card (~7 µs of work for SD1.5's
350 layers together ~2.4 ms) but tens of µs of Python and launch on the host. With the originals on the device
every address a set's sums touch is fixed — each weight's original, its patched buffer, the placed factors — so
the sums of a set can be captured once and replayed as one graph: the same kernels on the same addresses,
bit-identical to running them one by one, for about the time the card needs.

``FusedPatcher`` asks ``SwitchGraphs.replay`` before summing a plan: the first time a set is applied it runs
eagerly (which allocates the buffers and warms cuBLAS) and is remembered; the next time it is captured and
replayed, later times replayed. A graph is used only while every buffer and original it captured is still the
one the patcher holds (a restore or a host-memory original drops it). Off unless ``LORAKIT_SWITCH_GRAPHS=1``
(or ``enabled``) until a GPU run has confirmed it bit-exact (``tests/test_gpu.py``).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .plan import ParamKey, Plan

log = logging.getLogger("lorakit")
GRAPHS_KEEP = 4  # sets with a recorded switch (each holds its factors' fp16 copies in the graph's memory pool)
Work = Callable[[], None]
Capture = Callable[[Work, torch.device], Work]


def cuda_capture(work: Work, device: torch.device) -> Work:
    """``work`` recorded (not run) as a CUDA graph on ``device``; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(device)
    # thread_local: a server's other threads may touch CUDA while this one records
    with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        work()
    return graph.replay


@dataclass
class _Recorded:
    plan: Plan  # held: the factors the graph reads stay alive
    keys: list[ParamKey]
    buffers: list[torch.Tensor]
    originals: list[torch.Tensor]
    replay: Work


class SwitchGraphs:
    """Recorded switches of one ``FusedPatcher``, keyed by plan (``PlanCache`` hands back the same plan for the
    same set)."""

    def __init__(self, capture: Capture = cuda_capture, enabled: bool | None = None) -> None:
        self.capture = capture
        self.enabled = os.environ.get("LORAKIT_SWITCH_GRAPHS") == "1" if enabled is None else enabled
        self._recorded: OrderedDict[int, _Recorded] = OrderedDict()
        self._seen: OrderedDict[int, Plan] = OrderedDict()  # applied eagerly once: recorded next time
        self._refused: OrderedDict[int, Plan] = OrderedDict()  # a sum not graph-safe (bf16, a non-low-rank type…)
        self.captures = 0  # how many were recorded (tests, debug)

    def clear(self) -> None:
        self._recorded.clear()
        self._seen.clear()
        self._refused.clear()

    def replay(self, plan: Plan, buffers: dict[ParamKey, torch.Tensor], originals: dict[ParamKey, torch.Tensor],
               work_for: Callable[[list[ParamKey]], Work | None], device: torch.device | None,
               fresh: bool = False) -> bool:
        """Run ``plan``'s sums as a graph when one is recorded (or can be now); ``False``: sum eagerly.
        ``work_for(keys)`` gives the eager sums of ``keys`` into their buffers, or ``None`` when some key cannot
        be summed in one graph-safe op; ``fresh``: some weights are patched for the first time (no buffer yet)."""
        if not self.enabled or device is None:
            return False
        key = id(plan)
        rec = self._recorded.get(key)
        if rec is not None and rec.plan is plan and self._valid(rec, buffers, originals):
            self._recorded.move_to_end(key)
            rec.replay()
            return True
        self._recorded.pop(key, None)
        if self._refused.get(key) is plan:
            return False
        if fresh or self._seen.get(key) is not plan:
            _remember(self._seen, key, plan)
            return False
        keys = list(plan.signatures())
        if any(k not in buffers or k not in originals for k in keys):
            return False
        work = work_for(keys)
        if work is None:
            _remember(self._refused, key, plan)
            return False
        try:
            replay = self.capture(work, device)
        except RuntimeError as e:  # a driver or allocator that cannot record: this set switches eagerly
            log.warning(f"could not record the LoRA switch as a CUDA graph ({e}); switching without")
            _remember(self._refused, key, plan)
            return False
        rec = _Recorded(plan, keys, [buffers[k] for k in keys], [originals[k] for k in keys], replay)
        self.captures += 1
        self._recorded[key] = rec
        while len(self._recorded) > GRAPHS_KEEP:
            self._recorded.popitem(last=False)
        rec.replay()
        return True

    @staticmethod
    def _valid(rec: _Recorded, buffers: dict[ParamKey, torch.Tensor],
               originals: dict[ParamKey, torch.Tensor]) -> bool:
        return all(buffers.get(k) is b and originals.get(k) is o
                   for k, b, o in zip(rec.keys, rec.buffers, rec.originals))


def _remember(items: OrderedDict[int, Plan], key: int, plan: Plan) -> None:
    items[key] = plan
    while len(items) > GRAPHS_KEEP:
        items.popitem(last=False)
