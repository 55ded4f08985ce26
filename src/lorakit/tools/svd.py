"""Truncated SVD, rank selection and error measurement shared by merge, extract and resize.

For a layer's ΔW flattened to M (out, n = in·kh·kw) with singular values σ₁ ≥ σ₂ ≥ …:

- ``rank`` R: keep min(R, #σ) (never an IndexError when R exceeds what the layer has).
- ``sv_ratio`` t: keep every σᵢ ≥ σ₁/t.
- ``sv_fro`` t: the smallest k with √(Σᵢ≤ₖ σᵢ² / Σσ²) ≥ t (the kept part's share of ‖M‖_F).
- ``sv_cumulative`` t: the smallest k with Σᵢ≤ₖ σᵢ / Σσ ≥ t.

The dynamic rules keep exactly that k (kohya's resize keeps one more for ``sv_fro``/``sv_cumulative`` and never all
of them); a ``max_rank`` caps k. A kept rank-k part is M_k = U_k·diag(σ)·V_kᵀ, written as
up = U_k·√σ (out, k), down = √σ·V_kᵀ (k, n) — balanced factors lose the least in half precision. No clamping.

ΔW given as factors (``factored_svd``: up (out, r) @ down (r, n)) is decomposed exactly through two thin QRs
and an r×r SVD. Dense M uses a randomized range finder (with power iterations until the kept energy stops
changing) when the rule bounds k well below min(out, n) (and the layer is not tiny), else ``torch.linalg.svd``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import ToolError

Tensor = torch.Tensor
METHODS = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")
OVERSAMPLE = 10
MAX_POWER_ITERS = 8
TOL = 1e-6  # thresholds of the dynamic rules are met within this (singular values carry fp32 noise)
MIN_RANDOMIZED = 256  # below this a full SVD is as fast
CONVERGED = 1e-3  # relative change of the discarded energy between power iterations


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: ``method`` with ``value`` (a rank, or a threshold), capped by
    ``max_rank``; ``conv_rank`` replaces the rank (or cap) for k×k convolutions (0: leave them out)."""

    method: str = "rank"
    value: float = 4
    max_rank: int | None = None
    conv_rank: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ToolError(f"unknown rank rule {self.method!r}; use one of {', '.join(METHODS)}")
        if not math.isfinite(self.value):  # NaN passes every comparison below
            raise ToolError(f"--{self.method.replace('_', '-')} must be a finite number, got {self.value:g}")
        if self.method == "rank" and (self.value < 1 or self.value != int(self.value)):
            raise ToolError(f"--rank must be a whole number ≥ 1, got {self.value:g}")
        if self.method in ("sv_fro", "sv_cumulative") and not 0 < self.value <= 1:
            raise ToolError(f"--{self.method.replace('_', '-')} must be in (0, 1], got {self.value:g}")
        if self.method == "sv_ratio" and self.value < 1:
            raise ToolError(f"--sv-ratio must be ≥ 1 (σ ≥ σ_max/ratio are kept), got {self.value:g}")
        for name, v in (("rank", self.max_rank), ("conv-rank", self.conv_rank)):
            if v is not None and v < 0:
                raise ToolError(f"--{name} must be ≥ 0, got {v}")

    def for_layer(self, conv: bool) -> RankRule | None:
        """The rule of one layer: k×k convolutions use ``conv_rank`` in place of the rank or cap; ``None`` when
        ``conv_rank`` is 0 (leave them out)."""
        if not conv or self.conv_rank is None:
            return self
        if self.conv_rank == 0:
            return None
        if self.method == "rank":
            return replace(self, value=self.conv_rank, conv_rank=None)
        return replace(self, max_rank=self.conv_rank, conv_rank=None)

    def bound(self) -> int | None:
        """The most singular values this rule can keep (``None``: it depends on all of them)."""
        if self.method == "rank":
            return int(self.value)
        return self.max_rank if self.method != "sv_cumulative" else None

    def describe(self) -> str:
        text = f"rank {int(self.value)}" if self.method == "rank" else f"{self.method} {self.value:g}"
        return text + (f", at most {self.max_rank}" if self.max_rank else "") + \
            (f", conv {self.conv_rank}" if self.conv_rank is not None else "")


def choose_rank(s: Tensor, rule: RankRule, total2: float | None = None) -> int:
    """k for singular values ``s`` (descending); ``total2`` = ‖M‖_F² when ``s`` is only the leading part."""
    s = s.detach().cpu().double()
    n = int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0
    if n == 0:
        return 0
    s = s[:n]
    if rule.method == "rank":
        k = int(rule.value)
    elif rule.method == "sv_ratio":
        k = int((s >= s[0] / rule.value * (1 - TOL)).sum())
    elif rule.method == "sv_fro":
        share = s.pow(2).cumsum(0) / (total2 if total2 else float(s.pow(2).sum()))
        k = int(torch.searchsorted(share, torch.tensor(rule.value ** 2 * (1 - TOL), dtype=share.dtype))) + 1
    else:
        share = s.cumsum(0) / s.sum()
        k = int(torch.searchsorted(share, torch.tensor(rule.value * (1 - TOL), dtype=share.dtype))) + 1
    if rule.max_rank:
        k = min(k, rule.max_rank)
    return max(1, min(k, n))


@dataclass
class Decomposition:
    """Leading singular triplets of M on its device: ``u`` (out, q), ``s`` (q,), ``vh`` (q, n); ``total2`` =
    ‖M‖_F²."""

    u: Tensor
    s: Tensor
    vh: Tensor
    total2: float
    method: str

    def split(self, k: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(up (out, k), down (k, n)) = (U_k·√σ, √σ·V_kᵀ), cast to ``dtype``."""
        root = self.s[:k].sqrt()
        up, down = self.u[:, :k] * root, root[:, None] * self.vh[:k]
        return (up, down) if dtype is None else (up.to(dtype), down.to(dtype))


def factored_svd(up: Tensor, down: Tensor) -> Decomposition:
    """Exact SVD of up (out, r) @ down (r, n): QR of both factors, SVD of the r×r core — fp64 on the CPU (cheap:
    O((out + n)·r²))."""
    qu, ru = torch.linalg.qr(up.detach().cpu().double())
    qd, rd = torch.linalg.qr(down.detach().cpu().double().T)
    cu, s, cvh = torch.linalg.svd(ru @ rd.T)
    u, vh = (qu @ cu).to(up.dtype), (cvh @ qd.T).to(up.dtype)
    return Decomposition(u, s, vh, float(s.pow(2).sum()), "factored")


def dense_svd(m: Tensor, rule: RankRule, seed: int = 0) -> Decomposition:
    """The decomposition of dense M (fp32, any device) that ``rule`` needs."""
    k = rule.bound()
    small = min(m.shape)
    total2 = square_norm(m)
    if k is not None and max((k + OVERSAMPLE) * 4, MIN_RANDOMIZED) <= small:
        found = _randomized(m, k + OVERSAMPLE, total2, seed)
        if found is not None:
            return found
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return Decomposition(u, s, vh, total2, "full")


def _randomized(m: Tensor, q: int, total2: float, seed: int) -> Decomposition | None:
    """Range finder with power iterations (Halko et al.), iterated until the energy the q-dimensional subspace
    misses, ‖M‖² − ‖QᵀM‖², changes by < ``CONVERGED`` between iterations; ``None`` when it does not settle (the
    caller then runs a full SVD). The SVD at the end is of the thin (n, q) matrix MᵀQ."""
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(m.shape[1], q, generator=gen, device=m.device, dtype=m.dtype)
    qm = torch.linalg.qr(m @ omega).Q
    last = None
    for _ in range(MAX_POWER_ITERS):
        z = m.T @ qm  # (n, q) = (QᵀM)ᵀ
        rest = max(total2 - square_norm(z), 0.0)
        if last is not None and abs(last - rest) <= CONVERGED * max(rest, 1e-30 * total2):
            uz, s, vhz = torch.linalg.svd(z, full_matrices=False)  # QᵀM = vhzᵀ·diag(s)·uzᵀ
            return Decomposition(qm @ vhz.T, s, uz.T, total2, "randomized")
        last = rest
        qm = torch.linalg.qr(m @ torch.linalg.qr(z).Q).Q
    return None


def factor_error2(a_up: Tensor, a_down: Tensor, b_up: Tensor, b_down: Tensor) -> tuple[float, float]:
    """(‖A − B‖_F², ‖A‖_F²) for A = a_up@a_down, B = b_up@b_down without forming them (fp64 Gram matrices)."""
    au, ad, bu, bd = (t.double() for t in (a_up, a_down, b_up, b_down))
    aa = float(((au.T @ au) * (ad @ ad.T)).sum())
    bb = float(((bu.T @ bu) * (bd @ bd.T)).sum())
    ab = float(((au.T @ bu) * (ad @ bd.T)).sum())
    return max(aa + bb - 2 * ab, 0.0), aa


def dense_error2(m: Tensor, up: Tensor, down: Tensor) -> float:
    """‖M − up@down‖_F² with the factors as stored (any dtype), in fp32 on M's device."""
    r = m.float() - up.to(m.device).float() @ down.to(m.device).float()
    return square_norm(r)


def square_norm(t: Tensor) -> float:
    """‖t‖_F², summed in fp64 where the device has it (MPS has no fp64)."""
    if t.device.type == "mps":
        return float(torch.linalg.vector_norm(t.float())) ** 2
    return float(t.double().pow(2).sum())


def diff_dot(a: Tensor, b: Tensor, c: Tensor, d: Tensor, rows: int = 1024) -> float:
    """Σ (a − b)·(c − d) over all elements, in fp64 (fp32 on MPS), a block of rows at a time: never a full-size fp64
    copy (a FLUX.1 layer's is 0.4 GB). ``diff_dot(a, b, a, b)`` = ‖a − b‖²."""
    wide = torch.float32 if a.device.type == "mps" else torch.float64
    total = 0.0
    for i in range(0, a.shape[0], rows):
        rs = slice(i, i + rows)
        total += float(((a[rs].to(wide) - b[rs].to(wide)) * (c[rs].to(wide) - d[rs].to(wide))).sum())
    return total
