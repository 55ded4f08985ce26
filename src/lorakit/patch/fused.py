"""Fused patching: LoRA deltas summed into the weights, originals kept, restore bit-exact.

Per parameter: ``patched = cast(fp32(W_orig) + Σ mᵢ·ΔWᵢ)``, on the weight's device. A parameter whose set of
contributions is unchanged is skipped; one no longer touched gets its original back. The originals live in one of
two places (``originals_mode``; ``auto`` picks per apply by free device memory, see ``originals.py``):

- ``device``: the original tensor object is kept as it is and never written; the patched values go to a second
  buffer (reused on the next switch), swapped in with ``param.data = patched``; restore swaps the original back.
- ``host``: a bit-exact copy goes to host memory (pinned when CUDA is available) and the weight's own storage is
  patched in place (no second device buffer); a switch first copies the original values back, restore copies them
  back and drops the host copy. The LoRA factors then live in host memory too (``Patcher.set``) and each layer's
  are copied to the device only for its sum: nothing of the LoRAs stays on the card.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch

from ..adapters import functional as fn
from ..models.host_memory import host_copies
from .originals import choose_places, describe_places
from .placement import on_device
from .plan import Contribution, ParamKey, Plan, Signature
from .recorded import RecordedSwitches, Work

log = logging.getLogger("lorakit")
CHUNK_ELEMENTS = {"cpu": 1 << 20}  # fp32 per block: 4 MiB stays in a CPU cache
GPU_CHUNK_ELEMENTS = 1 << 24  # accelerators: few, large blocks (launches cost more than cache misses); 64 MiB fp32
LOW_MEMORY_CHUNK_ELEMENTS = 1 << 22  # originals on the host (the low-memory choice): 16 MiB fp32 at most
GEMM_DEVICES = {"cuda"}  # cuBLAS sums a half-precision addmm in fp32 and rounds once
# fp16 factors carry 11 bits: their rounding (≤ 2⁻¹¹·|ΔW|) stays below one rounding of the patched weight. bf16's
# 8 bits do not (seen on an H200: 11 of 36,864 elements off by more than one bf16 rounding where W+ΔW cancels), so
# bf16 weights take the fp32 row-block path — as many launches, exact.
GEMM_DTYPES = {torch.float16}
GemmFactors = tuple[torch.Tensor, torch.Tensor, float]
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
GemmJob = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]


class FusedPatcher:
    def __init__(self, originals_mode: str = "auto") -> None:
        self.originals_mode = originals_mode  # "auto" | "device" | "host"
        self.originals: dict[ParamKey, torch.Tensor] = {}  # kept on the device: the original tensor objects
        self.host: dict[ParamKey, torch.Tensor] = {}  # kept on the host: bit-exact copies
        self.params: dict[ParamKey, torch.nn.Parameter] = {}
        self.signatures: dict[ParamKey, Signature] = {}
        self.buffers: dict[ParamKey, torch.Tensor] = {}  # originals on the device: each weight's patched values
        self.recorded = RecordedSwitches()  # a set switched back to replays its prepared sums (recorded.py)
        # One-addmm factors in the weights' dtype (originals on the device only), of this switch and the one before:
        # switching back and forth between two sets casts nothing again (on a GPU: two launches less per layer).
        self._gemm: dict[tuple[ParamKey, Signature], GemmFactors] = {}
        self._gemm_before: dict[tuple[ParamKey, Signature], GemmFactors] = {}
        self._gemm_next: dict[tuple[ParamKey, Signature], GemmFactors] = {}
        self._scratch: torch.Tensor | None = None

    def apply(self, plan: Plan) -> int:
        """Bring the model to ``plan``; returns how many parameters were (re)computed."""
        entries, signatures = plan.param_entries(), plan.signatures()
        for key in [k for k in self.params if k not in entries]:
            self._restore(key)
        todo = {}
        for key, sig in signatures.items():
            if self.signatures.get(key) != sig:
                todo[key] = (entries[key], sig)
        new = {k: getattr(plan.modules[k[0]], k[1]) for k in todo if k not in self.params}
        self._keep_originals(new)
        for key in todo:
            self.signatures.pop(key, None)  # until its sum is done (a failure half-way still restores it)
        # every weight changes (a switch, not a partial update): a recording replays the sums of all of them
        if todo and len(todo) == len(signatures) and self.recorded.replay(
                plan, self._switch_work, _device_of(self.originals, todo), fresh=bool(new)):
            for key, (_, sig) in todo.items():
                self.params[key].data = self.buffers[key]
                self.signatures[key] = sig
            return len(todo)
        self._gemm_next = {}
        for key, (contribs, sig) in todo.items():
            self._patch(key, contribs, fresh=key in new, sig=sig)
            self.signatures[key] = sig
        self._gemm_before, self._gemm, self._gemm_next = self._gemm, self._gemm_next, {}
        if self.originals_mode == "host":
            self._scratch = None  # the low-memory choice keeps no buffer on the device between switches
        return len(todo)

    def restore(self) -> None:
        for key in list(self.params):
            self._restore(key)
        self._scratch = None
        self.recorded.clear()
        self._gemm, self._gemm_before, self._gemm_next = {}, {}, {}

    @property
    def active(self) -> bool:
        return bool(self.params)

    def original(self, key: ParamKey) -> torch.Tensor | None:
        """The original of a patched parameter (on the device, or its host copy); ``None`` when not patched."""
        return self.originals.get(key, self.host.get(key))

    @property
    def originals_location(self) -> str:
        """``device``, ``host``, ``device+host`` (some of each) or ``none`` (nothing patched)."""
        places = [p for p, d in (("device", self.originals), ("host", self.host)) if d]
        return "+".join(places) or "none"

    def _keep_originals(self, new: dict[ParamKey, torch.nn.Parameter]) -> None:
        """Keep the originals of parameters patched for the first time, where ``originals_mode`` says."""
        places = choose_places(new, self.originals_mode)
        to_host = [key for key in new if places[key] == "host"]
        originals = [new[key].data for key in to_host]
        pin = any(t.device.type == "cuda" for t in originals)  # pinned, packed by the layers that go together
        copies = dict(zip(to_host, host_copies(originals, pin=pin, groups=[_restored_together(k, t) for k, t in
                                                                          zip(to_host, originals)])))
        for key, param in new.items():  # nothing is registered before every host copy exists
            if key in copies:
                self.host[key] = copies[key]
            else:
                self.originals[key] = param.data
            self.params[key] = param
        if new:  # said aloud when ``auto`` ran out of device memory: switches then cost a host→device copy
            spilled = self.originals_mode == "auto" and "host" in places.values()
            log.log(logging.INFO if spilled else logging.DEBUG, describe_places(new, places, self.originals_mode))

    def _restore(self, key: ParamKey) -> None:
        param = self.params.pop(key)
        if key in self.host:
            host = self.host.pop(key)
            param.data.copy_(host, non_blocking=host.is_pinned())  # pinned memory stays alive until copied
        else:
            param.data = self.originals.pop(key)
            if self.buffers.pop(key, None) is not None:
                self.recorded.drop_recordings(key)  # those that write this buffer: let it go
        self.signatures.pop(key, None)

    def _patch(self, key: ParamKey, contribs: list[tuple[Contribution, str]], fresh: bool,
               sig: Signature | None = None) -> None:
        param = self.params[key]
        contribs = [(_beside(c, param.device), which) for c, which in contribs]  # host-placed factors: moved now
        if key in self.host:  # patched in place: a switch starts again from the original values
            out = orig = param.data
            if not fresh:
                out.copy_(self.host[key], non_blocking=self.host[key].is_pinned())
        else:
            orig = self.originals[key]
            if key not in self.buffers:
                self.buffers[key] = torch.empty_like(orig)
            out = self.buffers[key]
        cache_key = None if key in self.host or sig is None else (key, sig)
        if not self._sum_gemm(out, orig, contribs, cache_key) and not self._sum_in_chunks(out, orig, contribs):
            self._sum_whole(out, orig, contribs)
        param.data = out

    def _sum_whole(self, out: torch.Tensor, orig: torch.Tensor, contribs: list[tuple[Contribution, str]]) -> None:
        """out = cast(fp32(orig) + Σ ΔW); fp32 weights are summed in ``out`` itself (one pass for a LoRA).
        ``out`` may be ``orig`` itself (originals on the host): then ``acc`` already holds the original values, and
        types whose ΔW reads W get a copy of it, since ``acc`` changes as contributions are added."""
        in_place = out.data_ptr() == orig.data_ptr()
        # channels_last weights (a diffusers speed-up) are summed in a contiguous fp32 scratch: the math views rows
        acc = out if orig.dtype == torch.float32 and out.is_contiguous() else self._fp32(orig)
        w32 = orig
        if _needs_weight(contribs) and (orig.dtype != torch.float32 or in_place or not orig.is_contiguous()):
            w32 = orig.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        first, which0 = contribs[0]
        if in_place and acc is out:
            pass
        elif which0 == "weight" and acc is out and first.adapter.write_sum(acc, orig, first.strength, first.dyn):
            contribs = contribs[1:]
        else:
            acc.copy_(orig)
        for c, which in contribs:
            if which == "weight":
                c.adapter.add_into(acc, w32, c.strength, c.dyn)
            else:
                acc.add_(c.adapter.bias_delta(c.strength).reshape(acc.shape))  # type: ignore[union-attr]
        if acc is not out:
            out.copy_(acc)

    def _sum_in_chunks(self, out: torch.Tensor, orig: torch.Tensor,
                       contribs: list[tuple[Contribution, str]]) -> bool:
        """Half-precision weights, low-rank contributions only: fp32 sums over row blocks (cache-sized on the CPU),
        so no full-size fp32 temporary exists. ``False`` (nothing written) when a contribution is not low-rank.
        Each block is read before it is written, so ``out`` may be ``orig`` itself."""
        factors = _low_rank(orig, contribs) if _rows_viewable(out, orig) else None
        if factors is None:
            return False
        o2, w2 = out.view(out.shape[0], -1), orig.view(orig.shape[0], -1)
        budget = LOW_MEMORY_CHUNK_ELEMENTS if self.originals_mode == "host" else GPU_CHUNK_ELEMENTS
        step = max(1, CHUNK_ELEMENTS.get(orig.device.type, budget) // w2.shape[1])
        for start in range(0, w2.shape[0], step):
            rows = slice(start, min(start + step, w2.shape[0]))
            acc = self._fp32(w2[rows])
            acc.copy_(w2[rows])
            for up, down, alpha in factors:
                fn.add_low_rank_rows(acc, up, down, rows, alpha)
            o2[rows].copy_(acc)
        return True

    def _sum_gemm(self, out: torch.Tensor, orig: torch.Tensor, contribs: list[tuple[Contribution, str]],
                  cache_key: tuple[ParamKey, Signature] | None = None) -> bool:
        """CUDA, half-precision weights, low-rank contributions: ``out = orig + U@D`` in one addmm, U and D the
        factors side by side along the rank (each ``up`` scaled by its strength·α/r). cuBLAS reads ``orig``,
        sums in fp32 and rounds once — one read and one write of the weight, the switch's bandwidth floor.
        ``cache_key``: keep U, D for the next switch (``_gemm``)."""
        job = self._gemm_job(out, orig, contribs, cache_key)
        if job is None:
            return False
        o2, w2, u, d, alpha = job
        if cache_key is not None:
            self._gemm_next[cache_key] = (u, d, alpha)
        if o2.data_ptr() == w2.data_ptr():
            o2.addmm_(u, d, alpha=alpha)
        else:
            torch.addmm(w2, u, d, alpha=alpha, out=o2)
        return True

    def _gemm_job(self, out: torch.Tensor, orig: torch.Tensor, contribs: list[tuple[Contribution, str]],
                  cache_key: tuple[ParamKey, Signature] | None) -> GemmJob | None:
        """``(out rows, orig rows, U, D, scale)`` of a one-``addmm`` sum, the factors kept from the last two
        switches when ``cache_key`` names them, else made; ``None`` when the sum is not one ``addmm``."""
        if not (_one_addmm(orig) and _rows_viewable(out, orig)):
            return None
        kept = None if cache_key is None else self._gemm.get(cache_key) or self._gemm_before.get(cache_key)
        factors = kept or _gemm_factors(orig, contribs)
        if factors is None:
            return None
        return (out.view(out.shape[0], -1), orig.view(orig.shape[0], -1), *factors)

    def _switch_work(self, plan: Plan) -> Work | None:
        """The sums of all ``plan``'s weights into their buffers as a prepared list of ``addmm`` calls (views and
        factors made now; what ``recorded.py`` replays or captures as a CUDA graph: no allocation, no host sync),
        or ``None`` when some weight's sum is not one ``addmm`` on the originals' device."""
        entries, jobs, device = plan.param_entries(), [], None
        for key, sig in plan.signatures().items():
            orig, out = self.originals.get(key), self.buffers.get(key)
            if orig is None or out is None:  # kept on the host (``auto`` ran out of device memory)
                return None
            device = device or orig.device
            job = self._gemm_job(out, orig, entries[key], (key, sig)) if orig.device == device else None
            if job is None or job[2].device != device or job[3].device != device:
                return None
            jobs.append(job)

        def work() -> None:  # the very call ``_sum_gemm`` makes: a replay is bit-identical to the eager switch
            for o2, w2, u, d, alpha in jobs:
                torch.addmm(w2, u, d, alpha=alpha, out=o2)
        return work

    def _fp32(self, like: torch.Tensor) -> torch.Tensor:
        """A reused fp32 scratch buffer with ``like``'s shape and device (half-precision weights are summed in
        fp32)."""
        n = like.numel()
        if self._scratch is None or self._scratch.numel() < n or self._scratch.device != like.device:
            self._scratch = torch.empty(n, dtype=torch.float32, device=like.device)
        return self._scratch[:n].view(like.shape)


def _one_addmm(orig: torch.Tensor) -> bool:
    """Whether a low-rank sum into ``orig`` is one half-precision ``addmm`` (``GEMM_DEVICES``/``GEMM_DTYPES``)."""
    return orig.device.type in GEMM_DEVICES and orig.dtype in GEMM_DTYPES


def _restored_together(key: ParamKey, weight: torch.Tensor) -> tuple[str, ...]:
    """Which originals share pinned chunks: those that sets with fewer layers drop together — a text encoder, a
    diffusers UNet block (``down_blocks.1``: block weights that zero it whole) or transformer block, its 3×3
    convolutions (LoCon's, not LoRA's) — so such a switch frees whole chunks."""
    parts = key[0].split(".")
    block: list[str] = []
    if parts[0] in ("unet", "transformer"):
        block = parts[1:3] if parts[1:2] and parts[1] in BLOCK_LISTS else parts[1:2]
    conv = weight.dim() == 4 and weight.shape[-1] * weight.shape[-2] > 1
    return (parts[0], *block, "conv" if conv else "")


def _rows_viewable(out: torch.Tensor, orig: torch.Tensor) -> bool:
    """Whether both can be viewed as (rows, columns) matrices: contiguous (not channels_last)."""
    return out.is_contiguous() and orig.is_contiguous()


def _low_rank(orig: torch.Tensor, contribs: list[tuple[Contribution, str]]) -> list[tuple[torch.Tensor,
                                                                                          torch.Tensor, float]] | None:
    """``[(up (out, r), down (r, in·k·k), strength·α/r)]`` fp32 when ``orig`` is half precision and every
    contribution is a low-rank weight change; else ``None``."""
    if orig.dtype == torch.float32 or any(which != "weight" for _, which in contribs):
        return None
    factors = []
    for c, _ in contribs:
        lr = c.adapter.low_rank(c.dyn)
        if lr is None:
            return None
        factors.append((lr[0], lr[1], lr[2] * c.strength))
    return factors


def _gemm_factors(orig: torch.Tensor, contribs: list[tuple[Contribution, str]]) -> GemmFactors | None:
    """``(U, D, scale)`` in ``orig``'s dtype with ``orig + scale·U@D`` the patched weight, or ``None`` when a
    contribution is not low-rank."""
    factors = _low_rank(orig, contribs)
    if factors is None:
        return None
    dt = orig.dtype
    if len(factors) == 1:
        up, down, alpha = factors[0]
        return up.to(dt), down.to(dt), alpha
    u = torch.cat([up * a for up, _, a in factors], dim=1).to(dt)
    return u, torch.cat([down for _, down, _ in factors]).to(dt), 1.0


def _device_of(originals: dict[ParamKey, torch.Tensor], keys: Mapping[ParamKey, object]) -> torch.device | None:
    """The device of the first of ``keys`` whose original is kept on the device (``None``: none is)."""
    first = next(iter(keys))
    return originals[first].device if first in originals else None


def _beside(c: Contribution, device: torch.device) -> Contribution:
    """``c`` with its factors on ``device`` (a transient copy when they were placed in host memory)."""
    adapter = on_device(c.adapter, device)
    return c if adapter is c.adapter else dataclasses.replace(c, adapter=adapter)


def _needs_weight(contribs: list[tuple[Contribution, str]]) -> bool:
    return any(c.adapter.needs_weight for c, _ in contribs)
