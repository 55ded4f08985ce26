"""Fused patching: LoRA deltas summed into the weights, originals kept, restore bit-exact.

Per parameter: ``patched = cast(fp32(W_orig) + Σ mᵢ·ΔWᵢ)``, computed into a buffer that is reused on the next
switch, then swapped in with ``param.data = patched``; the original tensor object is never written. A parameter
whose set of contributions is unchanged is skipped; one no longer touched gets its original back.
"""
from __future__ import annotations

import torch

from ..adapters import functional as fn
from .plan import Contribution, ParamKey, Plan

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of fp32 per block: stays in cache
Signature = tuple[tuple[object, float, int | None, str], ...]


class FusedPatcher:
    def __init__(self) -> None:
        self.originals: dict[ParamKey, torch.Tensor] = {}
        self.params: dict[ParamKey, torch.nn.Parameter] = {}
        self.signatures: dict[ParamKey, Signature] = {}
        self._scratch: torch.Tensor | None = None

    def apply(self, plan: Plan) -> int:
        """Bring the model to ``plan``; returns how many parameters were (re)computed."""
        entries = plan.param_entries()
        for key in [k for k in self.signatures if k not in entries]:
            self._restore(key)
        changed = 0
        for key, contribs in entries.items():
            sig: Signature = tuple((c.adapter, c.strength, c.dyn, which) for c, which in contribs)
            if self.signatures.get(key) == sig:
                continue
            self._patch(key, plan.modules[key[0]], contribs)
            self.signatures[key] = sig
            changed += 1
        return changed

    def restore(self) -> None:
        for key in list(self.signatures):
            self._restore(key)
        self._scratch = None

    @property
    def active(self) -> bool:
        return bool(self.signatures)

    def _restore(self, key: ParamKey) -> None:
        self.params[key].data = self.originals.pop(key)
        del self.params[key], self.signatures[key]

    def _patch(self, key: ParamKey, module: torch.nn.Module,
               contribs: list[tuple[Contribution, str]]) -> None:
        param = getattr(module, key[1])
        if key not in self.originals:
            self.originals[key] = param.data
            self.params[key] = param
        orig = self.originals[key]
        current = param.data
        out = current if current.data_ptr() != orig.data_ptr() else torch.empty_like(orig)
        if not self._sum_in_chunks(out, orig, contribs):
            self._sum_whole(out, orig, contribs)
        param.data = out

    def _sum_whole(self, out: torch.Tensor, orig: torch.Tensor, contribs: list[tuple[Contribution, str]]) -> None:
        """out = cast(fp32(orig) + Σ ΔW); fp32 weights are summed in ``out`` itself (one pass for a LoRA)."""
        acc = out if orig.dtype == torch.float32 else self._fp32(orig)
        w32 = orig if orig.dtype == torch.float32 or not _needs_weight(contribs) else orig.float()
        first, which0 = contribs[0]
        if which0 == "weight" and acc is out and first.adapter.write_sum(acc, orig, first.strength, first.dyn):
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
        """Half-precision weights, low-rank contributions only: fp32 sums over cache-sized row blocks, so no
        full-size fp32 temporary exists. ``False`` (nothing written) when a contribution is not low-rank."""
        if orig.dtype == torch.float32 or any(which != "weight" for _, which in contribs):
            return False
        factors = [(c.adapter.low_rank(c.dyn), c.strength) for c, _ in contribs]
        if any(f is None for f, _ in factors):
            return False
        o2, w2 = out.view(out.shape[0], -1), orig.view(orig.shape[0], -1)
        step = max(1, CHUNK_ELEMENTS // w2.shape[1])
        for start in range(0, w2.shape[0], step):
            rows = slice(start, min(start + step, w2.shape[0]))
            acc = self._fp32(w2[rows])
            acc.copy_(w2[rows])
            for lr, strength in factors:
                up, down, scale = lr  # type: ignore[misc]
                fn.add_low_rank_rows(acc, up, down, rows, scale * strength)
            o2[rows].copy_(acc)
        return True

    def _fp32(self, like: torch.Tensor) -> torch.Tensor:
        """A reused fp32 scratch buffer with ``like``'s shape (half-precision weights are summed in fp32)."""
        n = like.numel()
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.float32, device=like.device)
        return self._scratch[:n].view(like.shape)


def _needs_weight(contribs: list[tuple[Contribution, str]]) -> bool:
    return any(c.adapter.needs_weight for c, _ in contribs)
