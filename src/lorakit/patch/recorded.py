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
is recorded and replayed, later times replayed. A restore, or a weight's buffer dropped (a set with fewer layers
in between), drops the recordings: they hold the buffers they write (device memory), which must be the patcher's.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .plan import Plan

log = logging.getLogger("lorakit")
RECORDED_KEEP = 4  # sets with a recorded switch (each holds its factors' copies in the weights' dtype)
Work = Callable[[], None]
Capture = Callable[[Work, torch.device], Work]


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def cuda_capture(work: Work, device: torch.device) -> Work:
    """``work`` recorded as a CUDA graph on ``device``; returns its replay. ``work`` runs once first, on the stream
    the capture uses (one per device, kept), so the BLAS handle and workspace of that stream exist before capture
    (on ROCm, hipBLASLt creates its handle lazily per stream and cannot while capturing). That run writes the
    same values the replay that follows writes."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)  # the sums may overwrite buffers that queued work still reads
    with torch.cuda.device(device), torch.cuda.stream(stream):
        work()
    current.wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a server's other threads may touch CUDA while this one records
    with torch.cuda.device(device), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        work()
    return graph.replay


@dataclass
class _Recorded:
    plan: Plan  # held: its identity keys the recording
    replay: Work  # holds the buffers, originals and factors it reads and writes


class RecordedSwitches:
    """Recorded switches of one ``FusedPatcher``, keyed by plan (``PlanCache`` hands back the same plan for the
    same set). ``graphs``: capture each recording as a CUDA graph (default: ``LORAKIT_SWITCH_GRAPHS=1``);
    ``enabled=False`` records nothing (every switch eager)."""

    def __init__(self, capture: Capture = cuda_capture, graphs: bool | None = None, enabled: bool = True) -> None:
        self.capture = capture
        self.graphs = os.environ.get("LORAKIT_SWITCH_GRAPHS") == "1" if graphs is None else graphs
        self.enabled = enabled
        self._recorded: OrderedDict[int, _Recorded] = OrderedDict()
        self._seen: OrderedDict[int, Plan] = OrderedDict()  # applied eagerly once: recorded next time
        self._refused: OrderedDict[int, Plan] = OrderedDict()  # a sum not one addmm (bf16, a non-low-rank type…)
        self.recordings = 0  # how many were recorded (tests, debug)
        self.graphs_captured = 0  # of which captured as CUDA graphs

    def clear(self) -> None:
        self._recorded.clear()
        self._seen.clear()
        self._refused.clear()

    def drop_recordings(self) -> None:
        """Let the recordings go (they hold the buffers they write), keeping which sets were seen."""
        self._recorded.clear()

    def replay(self, plan: Plan, work_for: Callable[[Plan], Work | None], device: torch.device | None,
               fresh: bool = False) -> bool:
        """Run ``plan``'s sums from a recording when one is made (or can be now); ``False``: sum eagerly.
        ``work_for(plan)`` gives the prepared sums of all the plan's weights into their buffers, or ``None`` when
        some weight's sum is not one ``addmm``; ``fresh``: some weights are patched for the first time (no buffer
        yet); ``device``: where the originals are (``None``: on the host — never recorded). A recording stays right
        while the buffers and originals it holds are the patcher's: ``FusedPatcher`` drops the recordings whenever
        one of those goes (``drop_recordings``, ``clear``)."""
        if not self.enabled or device is None:
            return False
        key = id(plan)
        rec = self._recorded.get(key)
        if rec is not None and rec.plan is plan:
            self._recorded.move_to_end(key)
            rec.replay()
            return True
        self._recorded.pop(key, None)
        if self._refused.get(key) is plan:
            return False
        if fresh or self._seen.get(key) is not plan:
            _remember(self._seen, key, plan)
            return False
        work = work_for(plan)
        if work is None:
            _remember(self._refused, key, plan)
            return False
        rec = _Recorded(plan, self._record(work, device))
        self.recordings += 1
        self._recorded[key] = rec
        while len(self._recorded) > RECORDED_KEEP:
            self._recorded.popitem(last=False)
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


def _remember(items: OrderedDict[int, Plan], key: int, plan: Plan) -> None:
    items[key] = plan
    while len(items) > RECORDED_KEEP:
        items.popitem(last=False)
