"""A request's LoRA set as one canonical string — the multiplexed model id Serve routes by — and the count of
LoRA switches a replica (or a single server) makes.

The key names each LoRA by its place in the library (``chars/unet_only``: the same file whether the prompt says
``unet_only`` or ``chars/unet_only``) with its weights as written (text encoder and denoiser strengths, block
weights, schedules), sorted: prompt order does not change the set. The model's title comes first, so requests for
another base model never count as holding this one's sets.
"""
from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from ..errors import LorakitError
from ..generate.pipeline import Request
from ..prompt import LoraRef, parse_prompt

NO_LORAS = "-"
MAX_COUNTED = 256  # sets counted one by one (the totals count all)
MAX_KEY_CHARS = 500  # a longer key is shortened to a hash (the id travels with every request)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def ref_key(ref: LoraRef, name: str) -> str:
    """One LoRA with its weights: ``name:te=1,unet=0.5`` (+ blocks, dyn, lbw, start/stop where given)."""
    parts = [f"te={_fmt(ref.te)}", f"unet={_fmt(ref.unet)}"]
    parts += [f"{block}={_fmt(v)}" for block, v in ref.blocks]
    parts += [f"{k}={_fmt(v)}" for k, v in (("dyn", ref.dyn), ("lbw", ref.lbw), ("start", ref.start),
                                           ("stop", ref.stop)) if v is not None]
    return f"{name}:{','.join(parts)}"


def set_key(request: Request, resolve: Any = None) -> str:
    """The LoRA set of ``request`` (its prompt's and negative prompt's tags) as a canonical string; ``resolve``:
    name → canonical name (the library's sub-path); a name it cannot resolve is kept as written (lower case),
    so the request still routes and its replica reports the error. A malformed tag raises ``LorakitError``."""
    refs = parse_prompt(request.prompt).loras + parse_prompt(request.negative, negative=True).loras
    keys = sorted(ref_key(ref, _canonical(ref.name, resolve)) for ref in refs)
    return "|".join(keys) or NO_LORAS


def _canonical(name: str, resolve: Any) -> str:
    if resolve is not None:
        try:
            return str(resolve(name))
        except LorakitError:
            pass
    return name.lower()


def routing_id(model_title: str, lora_set: str) -> str:
    """The multiplexed model id: ``<model>#<set>`` (a hash when long)."""
    key = f"{model_title}#{lora_set}"
    if len(key) <= MAX_KEY_CHARS:
        return key
    return f"{model_title[:100]}#sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def job_key(requests: Sequence[Request], resolve: Any = None) -> str:
    """The set of a job (A1111's ``n_iter`` requests share the prompt: the first one's)."""
    return set_key(requests[0], resolve) if requests else NO_LORAS


class SetCounter:
    """LoRA switches as a process running requests one after another sees them: ``changes`` (a request whose set
    differs from the previous one's: weights re-patched) and ``misses`` (a set not among the ``keep`` most recently
    run: its plan is built again and its files read — what affinity routing saves). No LoRAs is not a set."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.last: str | None = None
        self.requests = 0
        self.changes: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.totals = {"changes": 0, "misses": 0}
        self.batches = 0  # runs of several requests in one denoiser batch (``--max-batch``)
        self.largest_batch = 0
        self._lock = threading.Lock()  # observed on the worker thread, read by the replica's reports

    def observe(self, key: str) -> None:
        with self._lock:
            self.requests += 1
            if key != self.last and key != NO_LORAS:
                self.changes[key] += 1
                self.totals["changes"] += 1
            if key not in self.recent and key != NO_LORAS:
                self.misses[key] += 1
                self.totals["misses"] += 1
            self.recent[key] = None
            self.recent.move_to_end(key)
            while len(self.recent) > self.keep:
                self.recent.popitem(last=False)
            self.last = key
            for counts in (self.changes, self.misses):
                if len(counts) > MAX_COUNTED:  # a long-running replica sees many sets: keep the report small
                    del counts[next(iter(counts))]

    def observe_batch(self, size: int) -> None:
        """A run of ``size`` requests in one batch (mixed LoRA sets through per-sample hooks)."""
        with self._lock:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, size)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "changes": dict(self.changes), "misses": dict(self.misses),
                    "batches": self.batches, "largest_batch": self.largest_batch,
                    **{f"{k}_total": v for k, v in self.totals.items()}}
