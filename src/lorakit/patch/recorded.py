"""A LoRA set's switch recorded once and replayed: a prepared list of ``addmm`` calls, or one CUDA graph.

With the originals on the device and half-precision weights on a GEMM device (CUDA fp16), each weight's patched
value is one ``addmm`` (``fused._sum_gemm``) and every address a set's sums touch is fixed — each weight's
original, its patched buffer, the factors cast for the ``addmm``. On a GPU such a switch is host-bound (SD1.5's 350
sums are ~2.4 ms of work, but tens of µs of Python and launch each), so a set switched back to is not worked out
again: its sums are recorded once and replayed —

- as a **prepared list** (the default): the ``addmm`` calls with their views and factors made beforehand, run in a
  tight loop — the same kernels on the same tensors as the eager switch, nothing else per weight;
- as a **CUDA graph** (``LORAKIT_SWITCH_GRAPHS=1``): that list captured once and replayed as one launch. Opt-in
  until a GPU run has confirmed it bit-exact (``tests/test_gpu.py``).

``FusedPatcher`` asks ``RecordedSwitches.replay`` before summing a plan whose every weight changes: the first time
a set is applied it runs eagerly (which allocates the buffers and warms cuBLAS) and is remembered; the next time it
is recorded and replayed, later times replayed. A recording holds what its sums read and write (a CUDA graph holds
nothing itself): the buffers, which must stay the patcher's — a restore drops every recording, a weight's buffer
dropped (a set with fewer layers in between) the recordings that write it — and the factors. A plan is held
weakly: once ``PlanCache`` lets it go its set can never be switched back to, and its recording goes with it.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .plan import ParamKey, Plan

log = logging.getLogger("lorakit")
RECORDED_KEEP = 4  # sets with a recorded switch (each holds its factors' copies in the weights' dtype)
Work = Callable[[], None]
Capture = Callable[[Work, torch.device], Work]
V = TypeVar("V")

_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_CAPTURE_LOCK = threading.Lock()  # one capture at a time in a process (two would share the capture stream)


def cuda_capture(work: Work, device: torch.device) -> Work:
    """``work`` recorded as a CUDA graph on ``device``; returns its replay. ``work`` runs once first, on the stream
    the capture uses (one per device, kept), so the BLAS handle and workspace of that stream exist before capture
    (on ROCm, hipBLASLt creates its handle lazily per stream and cannot while capturing). That run writes the
    same values the replay that follows writes."""
    with _CAPTURE_LOCK:
        stream = _CAPTURE_STREAMS.get(device)
        if stream is None:
            stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)  # the sums may overwrite buffers that queued work still reads
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                work()
        finally:
            current.wait_stream(stream)  # later work on the current stream comes after these sums, even on failure
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may touch CUDA while this one records
        with torch.cuda.device(device), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            work()
        return graph.replay


@dataclass
class _Recorded:
    keys: frozenset[ParamKey]  # the weights whose buffers it writes
    work: Work  # the prepared list: holds the buffers, originals and factors (a graph holds none of them)
    replay: Work  # ``work`` itself, or its CUDA graph's replay


class _PlanMap(Generic[V]):
    """Plan → value, at most ``RECORDED_KEEP`` (least recently used out), each plan held weakly: its entry goes when
    the plan is collected (``PlanCache`` let it go, so its set will get a new plan)."""

    def __init__(self) -> None:
        self._items: OrderedDict[int, tuple[weakref.ref[Plan], V]] = OrderedDict()

    def get(self, plan: Plan) -> V | None:
        hit = self._items.get(id(plan))
        if hit is None or hit[0]() is not plan:
            return None
        self._items.move_to_end(id(plan))
        return hit[1]

    def put(self, plan: Plan, value: V) -> None:
        key = id(plan)
        self._items[key] = (weakref.ref(plan, lambda _, k=key: self._items.pop(k, None)), value)  # type: ignore[misc]
        self._items.move_to_end(key)
        while len(self._items) > RECORDED_KEEP:
            self._items.popitem(last=False)

    def drop(self, plan: Plan) -> None:
        self._items.pop(id(plan), None)

    def values(self) -> list[V]:
        return [v for _, v in self._items.values()]

    def drop_where(self, test: Callable[[V], bool]) -> None:
        for key in [k for k, (_, v) in self._items.items() if test(v)]:
            del self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class RecordedSwitches:
    """Recorded switches of one ``FusedPatcher``, keyed by plan (``PlanCache`` hands back the same plan for the
    same set). ``graphs``: capture each recording as a CUDA graph (default: ``LORAKIT_SWITCH_GRAPHS=1``);
    ``enabled=False`` records nothing (every switch eager)."""

    def __init__(self, capture: Capture = cuda_capture, graphs: bool | None = None, enabled: bool = True) -> None:
        self.capture = capture
        self.graphs = os.environ.get("LORAKIT_SWITCH_GRAPHS") == "1" if graphs is None else graphs
        self.enabled = enabled
        self._recorded: _PlanMap[_Recorded] = _PlanMap()
        self._seen: _PlanMap[bool] = _PlanMap()  # applied eagerly once: recorded next time
        self._refused: _PlanMap[bool] = _PlanMap()  # a sum not one addmm (bf16, a non-low-rank type…)
        self.recordings = 0  # how many were recorded (tests, debug)
        self.graphs_captured = 0  # of which captured as CUDA graphs

    def clear(self) -> None:
        self._recorded.clear()
        self._seen.clear()
        self._refused.clear()

    def drop_recordings(self, key: ParamKey) -> None:
        """Let the recordings that write ``key``'s buffer go (the patcher drops that buffer); which sets were seen
        stays."""
        self._recorded.drop_where(lambda rec: key in rec.keys)

    def held(self) -> list[_Recorded]:
        """The recordings kept (tests, debug)."""
        return self._recorded.values()

    def replay(self, plan: Plan, work_for: Callable[[Plan], Work | None], device: torch.device | None,
               fresh: bool = False) -> bool:
        """Run ``plan``'s sums from a recording when one is made (or can be now); ``False``: sum eagerly.
        ``work_for(plan)`` gives the prepared sums of all the plan's weights into their buffers, or ``None`` when
        some weight's sum is not one ``addmm``; ``fresh``: some weights are patched for the first time (no buffer
        yet); ``device``: where the originals are (``None``: on the host — never recorded)."""
        if not self.enabled or device is None:
            return False
        rec = self._recorded.get(plan)
        if rec is not None:
            rec.replay()
            return True
        if self._refused.get(plan):
            return False
        if fresh or not self._seen.get(plan):
            self._seen.put(plan, True)
            return False
        work = work_for(plan)
        if work is None:
            self._refused.put(plan, True)
            return False
        rec = _Recorded(frozenset(plan.signatures()), work, self._record(work, device))
        self.recordings += 1
        self._recorded.put(plan, rec)
        rec.replay()
        return True

    def _record(self, work: Work, device: torch.device) -> Work:
        """``work`` as a CUDA graph's replay when ``graphs``, else itself (a prepared list)."""
        if not self.graphs:
            return work
        try:
            replay = self.capture(work, device)
        except RuntimeError as e:  # a driver or allocator that cannot record: the prepared list runs instead
            log.warning(f"could not record the LoRA switch as a CUDA graph ({e}); switching without")
            return work
        self.graphs_captured += 1
        return replay
