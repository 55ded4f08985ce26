"""All the math of every network type, as pure functions on fp32 tensors.

Shapes: W is the original weight ``(out, in[, kh, kw])``. Every ``*_delta`` returns ΔW with W's shape at unit
user strength unless it takes ``strength``; callers add ``strength · ΔW`` for the types that are linear in it.
The formulas are those of ``LORA_FORMATS.md``; the ``lycoris-lora`` package is the reference the tests hold us to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def flat2(t: Tensor) -> Tensor:
    """``(a, b, ...) → (a, b·...)``."""
    return t.reshape(t.shape[0], -1)


def lora_delta(up: Tensor, down: Tensor, mid: Tensor | None, scale: float, shape: torch.Size) -> Tensor:
    """LoRA / LoCon: ΔW = s·(up @ down); Tucker (``mid`` (r, r, kh, kw)):
    ΔW[i,j,k,l] = s·Σ up[i,n]·mid[n,m,k,l]·down[m,j]."""
    if mid is None:
        return (flat2(up) @ flat2(down)).mul_(scale).reshape(shape)
    d = torch.einsum("n m k l, i n, m j -> i j k l", mid, flat2(up), flat2(down))
    return d.mul_(scale).reshape(shape)


def add_low_rank_rows(acc: Tensor, up: Tensor, down: Tensor, rows: slice, alpha: float) -> None:
    """acc += alpha·(up[rows] @ down): rows ``rows`` of a low-rank ΔW, for patching in cache-sized blocks."""
    acc.addmm_(up[rows], down, alpha=alpha)


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS Tucker rebuild: t (r, r, k…), wa (r, out), wb (r, in) → (out, in, k…)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def loha_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t1: Tensor | None, t2: Tensor | None,
               scale: float, shape: torch.Size) -> Tensor:
    """LoHa: ΔW = s·(w1a@w1b) ⊙ (w2a@w2b); with Tucker each factor is rebuilt from (t, wa, wb)."""
    if t1 is not None and t2 is not None:
        d = _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b)
    else:
        d = (flat2(w1a) @ flat2(w1b)) * (flat2(w2a) @ flat2(w2b))
    return d.mul_(scale).reshape(shape)


def lokr_factor2(w2: Tensor | None, w2a: Tensor | None, w2b: Tensor | None, t2: Tensor | None) -> Tensor:
    """The second Kronecker factor: given, ``w2a @ w2b`` (conv: (out2, r)@(r, in2·k·k)), or Tucker."""
    if w2 is not None:
        return w2
    assert w2a is not None and w2b is not None  # guaranteed by the adapter's reader
    if t2 is not None:
        return _tucker(t2, w2a, w2b)
    return (w2a @ flat2(w2b)).reshape(w2a.shape[0], *w2b.shape[1:])


def lokr_delta(w1: Tensor, w2: Tensor, scale: float, shape: torch.Size) -> Tensor:
    """LoKr: ΔW = s·kron(W1, W2) (W1 broadcast over W2's kernel axes)."""
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous()).mul_(scale).reshape(shape)


def ia3_delta(weight: Tensor, vector: Tensor, on_input: bool) -> Tensor:
    """IA3: ΔW = W ⊙ w, w broadcast along the input axis (1) if ``on_input`` else along the output axis (0)."""
    v = vector.flatten()
    view = [1] * weight.dim()
    view[1 if on_input else 0] = v.numel()
    return weight * v.reshape(view)


def glora_delta(weight: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, scale: float) -> Tensor:
    """GLoRA, new layout (a1 (in,r), a2 (r,in), b1 (out,r), b2 (r,in)): ΔW = s·(W·A1·A2 + B1·B2), the A product
    acting on the input axis (axis 1) of a conv weight."""
    wa = flat2(a1) @ flat2(a2)  # (in, in)
    w_a = torch.einsum("o i ..., i j -> o j ...", weight, wa)
    wb = (flat2(b1) @ flat2(b2)).reshape(weight.shape)
    return (w_a + wb).mul_(scale)


def glora_old_delta(weight: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, scale: float) -> Tensor:
    """GLoRA, old layout (a1 (r,in), a2 (in,r), b1 (r,in), b2 (out,r)): ΔW = s·(B2·B1 + W·A2·A1)."""
    wa = flat2(a2) @ flat2(a1)
    w_a = torch.einsum("o i ..., i j -> o j ...", weight, wa)
    wb = (flat2(b2) @ flat2(b1)).reshape(weight.shape)
    return (w_a + wb).mul_(scale)


def cayley(blocks: Tensor, constraint: float) -> Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ; Q scaled down to Frobenius norm ``constraint`` when larger
    (``constraint`` ≤ 0: no limit). ``blocks`` (…, b, b)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = float(q.norm()) + 1e-8  # one Frobenius norm over all blocks, as kohya and LyCORIS
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_rotate(weight: Tensor, r: Tensor) -> Tensor:
    """Block-diagonal rotation of the output axis, LyCORIS/kohya convention: W'[k·b+m] = Σₙ R[k,n,m]·W[k·b+n]."""
    n_blocks, b, _ = r.shape
    w = weight.reshape(n_blocks, b, *weight.shape[1:])
    return torch.einsum("k n m, k n ... -> k m ...", r, w).reshape(weight.shape)


def oft_delta(weight: Tensor, rotation: Tensor, rescale: Tensor | None, strength: float) -> Tensor:
    """OFT: ΔW = m·(rescale ⊙ R·W − W) for block rotations R (n, b, b) — the Cayley transform of ``oft_blocks``,
    or old LyCORIS ``oft_diag`` as stored."""
    rotated = oft_rotate(weight, rotation)
    if rescale is not None:
        rotated = rotated * rescale.reshape(-1, *[1] * (weight.dim() - 1))
    return (rotated - weight).mul_(strength)


def boft_delta(weight: Tensor, blocks: Tensor, constraint: float, rescale: Tensor | None, strength: float) -> Tensor:
    """BOFT: W' = Π butterfly stages of block-diagonal Cayley rotations; ``blocks`` (m, n, b, b). The strength
    moves every stage towards the identity (LyCORIS): Rᵢ(m) = m·Rᵢ + (1−m)·I; ΔW = rescale ⊙ W' − W."""
    m_stages, _, b, _ = blocks.shape
    rot = cayley(blocks, constraint)
    eye = torch.eye(b, dtype=rot.dtype)
    if strength != 1:
        rot = rot * strength + (1 - strength) * eye
    x = weight
    for i in range(m_stages):
        k = 2 ** i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("b i j, b j ... -> b i ...", rot[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if rescale is not None:
        x = x * rescale.reshape(-1, *[1] * (weight.dim() - 1))
    return x - weight


def dora_delta(weight: Tensor, inner_delta: Tensor, magnitude: Tensor, per_output: bool, strength: float) -> Tensor:
    """DoRA: W' = W + ΔW_inner; W_dora = W'·mag/‖W'‖, the norm per output row (``per_output``) or per input
    column; ΔW = m·(W_dora − W)."""
    merged = weight + inner_delta
    if per_output:
        norm = flat2(merged).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        mag = magnitude.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (weight.dim() - 2))
        mag = magnitude.reshape(norm.shape)
    return (merged * (mag / norm) - weight).mul_(strength)


def module_op(module: torch.nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The module's own forward with another weight/bias — linear in (weight, bias) for every supported kind, so
    ``module_op(m, x, ΔW, Δb)`` is the output change a ΔW causes (hooks mode)."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, torch.nn.GroupNorm):
        xn = F.group_norm(x, module.num_groups, None, None, module.eps)
        return _affine(xn, weight, bias, axis=1)
    if isinstance(module, torch.nn.LayerNorm):
        xn = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return _affine(xn, weight, bias, axis=-1)
    raise TypeError(f"unsupported module type {type(module).__name__}")


def _affine(xn: Tensor, weight: Tensor, bias: Tensor | None, axis: int) -> Tensor:
    shape = [1] * xn.dim()
    shape[axis] = -1
    out = xn * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def lora_bypass(module: torch.nn.Module, x: Tensor, up: Tensor, down: Tensor, mid: Tensor | None,
                scale: float) -> Tensor:
    """Low-rank output change s·up(down(x)) without forming ΔW (hooks mode, LoRA/LoCon)."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(F.linear(x, flat2(down)), flat2(up)) * scale
    assert isinstance(module, torch.nn.Conv2d)
    kh, kw = module.kernel_size
    r = down.shape[0]
    up4 = up.reshape(up.shape[0], r, 1, 1)
    if mid is None:
        h = F.conv2d(x, down.reshape(r, -1, kh, kw), None, module.stride, module.padding, module.dilation)
    else:
        h = F.conv2d(x, down.reshape(r, -1, 1, 1))
        h = F.conv2d(h, mid, None, module.stride, module.padding, module.dilation)
    return F.conv2d(h, up4) * scale
