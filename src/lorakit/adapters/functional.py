"""All the math of every network type, as pure functions on fp32 tensors (differentiable: training runs through
them).

Shapes: W is the original weight ``(out, in[, kh, kw])``. Every ``*_delta`` returns ΔW with W's shape at unit
user strength unless it takes ``strength``; callers add ``strength · ΔW`` for the types that are linear in it.
The formulas are those of ``LORA_FORMATS.md``; the ``lycoris-lora`` package is the reference the tests hold us to.
No function here checks shapes: the adapters' ``shape_error`` has, before any of them runs, and every
intermediate below is at most the size of W or of a factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def flat2(t: Tensor) -> Tensor:
    """``(a, b, ...) → (a, b·...)``."""
    return t.reshape(t.shape[0], -1)


def per_channel(t: Tensor, v: Tensor, axis: int) -> Tensor:
    """``t`` with every slice along ``axis`` multiplied by the matching value of ``v`` (numel = t.shape[axis])."""
    view = [1] * t.dim()
    view[axis] = -1
    return t * v.reshape(view)


def tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """The one Tucker rebuild: core (r1, r2, k…), wa (r1, out), wb (r2, in) → (out, in, k…),
    X[p,q,…] = Σᵢⱼ core[i,j,…]·wa[i,p]·wb[j,q]."""
    return torch.einsum("i j ..., i p, j q -> p q ...", core, wa, wb)


def lora_delta(up: Tensor, down: Tensor, mid: Tensor | None, scale: float, shape: torch.Size) -> Tensor:
    """LoRA / LoCon: ΔW = s·(up @ down); Tucker (``mid`` (r, r, kh, kw)):
    ΔW[i,j,k,l] = s·Σ up[i,n]·mid[n,m,k,l]·down[m,j]."""
    if mid is None:
        return (flat2(up) @ flat2(down)).mul_(scale).reshape(shape)
    return tucker(mid, flat2(up).t(), flat2(down)).mul_(scale).reshape(shape)


def lora_add(acc: Tensor, up: Tensor, down: Tensor, scale: float) -> None:
    """acc += s·(up @ down) in place, without a ΔW temporary; ``acc`` fp32 with W's shape."""
    acc.view(acc.shape[0], -1).addmm_(flat2(up), flat2(down), alpha=scale)


def lora_write(out: Tensor, weight: Tensor, up: Tensor, down: Tensor, scale: float) -> None:
    """out = W + s·(up @ down) in one pass (fp32 ``out`` and ``weight`` of W's shape)."""
    torch.addmm(weight.view(weight.shape[0], -1), flat2(up), flat2(down), alpha=scale,
                out=out.view(out.shape[0], -1))


def add_low_rank_rows(acc: Tensor, up: Tensor, down: Tensor, rows: slice, alpha: float) -> None:
    """acc += alpha·(up[rows] @ down): rows ``rows`` of a low-rank ΔW, for patching in cache-sized blocks."""
    acc.addmm_(up[rows], down, alpha=alpha)


def loha_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t1: Tensor | None, t2: Tensor | None,
               scale: float, shape: torch.Size) -> Tensor:
    """LoHa: ΔW = s·(w1a@w1b) ⊙ (w2a@w2b); with Tucker each factor is ``tucker(t, wa, wb)``."""
    if t1 is not None and t2 is not None:
        d = tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)
    else:
        d = (flat2(w1a) @ flat2(w1b)) * (flat2(w2a) @ flat2(w2b))
    return d.mul_(scale).reshape(shape)


def lokr_factor(w: Tensor | None, wa: Tensor | None, wb: Tensor | None, t: Tensor | None) -> Tensor:
    """A Kronecker factor: given whole, or ``wa @ wb`` (conv: (out₂, r)@(r, in₂·k·k) keeping ``wb``'s trailing
    axes), or Tucker ``tucker(t, wa, wb)``; the adapter guarantees one complete form."""
    if w is not None:
        return w
    if wa is None or wb is None:
        raise ValueError("a LoKr factor needs w, or wa and wb")
    if t is not None:
        return tucker(t, wa, wb)
    return (wa @ flat2(wb)).reshape(wa.shape[0], *wb.shape[1:])


def lokr_delta(w1: Tensor, w2: Tensor, scale: float, shape: torch.Size) -> Tensor:
    """LoKr: ΔW = s·kron(W1, W2) (W1 broadcast over W2's kernel axes). The scale goes onto the smaller factor
    before the product: kron(s·W1, W2) is the same value with one rounding moved, and saves a pass over the
    full-size ΔW (a full-width FLUX.1 ``linear1`` is 264 MB in fp32)."""
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    if scale != 1.0:
        if w1.numel() <= w2.numel():
            w1 = w1 * scale
        else:
            w2 = w2 * scale
    return torch.kron(w1, w2.contiguous()).reshape(shape)


def ia3_delta(weight: Tensor, vector: Tensor, on_input: bool) -> Tensor:
    """IA3: ΔW = W ⊙ w, w broadcast along the input axis (1) if ``on_input`` else along the output axis (0)."""
    return per_channel(weight, vector, 1 if on_input else 0)


def glora_delta(weight: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, scale: float,
                old_layout: bool) -> Tensor:
    """GLoRA: ΔW = s·(W·A + B) with A = A1·A2 acting on the input axis (axis 1) and B = B1·B2, in the new layout
    (a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in·k·k)); the old one (a1 (r, in), a2 (in, r), b1 (r, in·k·k),
    b2 (out, r)) is ΔW = s·(W·A2·A1 + B2·B1). W·A is computed as (W·A₁)·A₂, never forming the (in, in) A."""
    first, second, up, down = (a2, a1, b2, b1) if old_layout else (a1, a2, b1, b2)
    w_a = torch.einsum("o i ..., i r -> o r ...", weight, flat2(first))
    w_a = torch.einsum("o r ..., r j -> o j ...", w_a, flat2(second))
    wb = (flat2(up) @ flat2(down)).reshape(weight.shape)
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
    rotation: Tensor = (eye + q) @ torch.linalg.inv(eye - q)
    return rotation


def oft_diag_rotation(rotation: Tensor, rescale: Tensor | None) -> Tensor:
    """Old LyCORIS ``oft_diag`` (n, b, b) is R itself; its ``rescale`` (n·b values) scales R's rows per block."""
    return rotation if rescale is None else rescale.reshape(rotation.shape[0], -1, 1) * rotation


def oft_rotate(weight: Tensor, r: Tensor) -> Tensor:
    """Block-diagonal rotation of the output axis, LyCORIS/kohya convention: W'[k·b+m] = Σₙ R[k,n,m]·W[k·b+n]."""
    n_blocks, b, _ = r.shape
    w = weight.reshape(n_blocks, b, *weight.shape[1:])
    return torch.einsum("k n m, k n ... -> k m ...", r, w).reshape(weight.shape)


def oft_delta(weight: Tensor, rotation: Tensor, rescale: Tensor | None, strength: float) -> Tensor:
    """OFT: ΔW = m·(rescale ⊙ R·W − W) for block rotations R (n, b, b) — the Cayley transform of
    ``oft_blocks``, or old LyCORIS ``oft_diag`` as stored; ``rescale`` (out values) per output row."""
    rotated = oft_rotate(weight, rotation)
    if rescale is not None:
        rotated = per_channel(rotated, rescale, 0)
    return (rotated - weight).mul_(strength)


def boft_delta(weight: Tensor, blocks: Tensor, constraint: float, rescale: Tensor | None, strength: float) -> Tensor:
    """BOFT: W' = Π butterfly stages of block-diagonal Cayley rotations; ``blocks`` (m, n, b, b). The strength
    moves every stage towards the identity (LyCORIS): Rᵢ(m) = m·Rᵢ + (1−m)·I; ΔW = rescale ⊙ W' − W."""
    m_stages, _, b, _ = blocks.shape
    rot = cayley(blocks, constraint)
    if strength != 1:
        rot = rot * strength + (1 - strength) * torch.eye(b, dtype=rot.dtype, device=rot.device)
    rest = weight.shape[1:]
    x = weight
    for i in range(m_stages):
        k = 2 ** i * (b // 2)
        x = x.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, b, *rest)  # gather the stage's butterfly pairs
        x = torch.einsum("b i j, b j ... -> b i ...", rot[i], x)
        x = x.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(weight.shape)
    if rescale is not None:
        x = per_channel(x, rescale, 0)
    return x - weight


def dora_delta(weight: Tensor, inner_delta: Tensor, magnitude: Tensor, per_output: bool, strength: float) -> Tensor:
    """DoRA: W' = W + ΔW_inner; W_dora = W'·mag/‖W'‖, the norm per output row (``per_output``) or per input
    column; ΔW = m·(W_dora − W)."""
    merged = weight + inner_delta
    axis = 0 if per_output else 1
    norm = merged.transpose(0, axis).reshape(merged.shape[axis], -1).norm(dim=1)
    return (per_channel(merged, magnitude.flatten() / norm, axis) - weight).mul_(strength)


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
    if is_rms_norm(module):
        return _affine(rms_normalized(module, x), weight, bias, axis=-1)
    raise TypeError(f"unsupported module type {type(module).__name__}")


def is_rms_norm(module: torch.nn.Module) -> bool:
    """torch's and diffusers' RMSNorm (FLUX's q/k norms): x / rms(x) over the last axis, times a weight."""
    return type(module).__name__ == "RMSNorm" and hasattr(module, "eps")


def rms_normalized(module: torch.nn.Module, x: Tensor) -> Tensor:
    """x / √(mean(x²) + ε) over the last axis, in fp32 as diffusers' RMSNorm computes it, in x's dtype."""
    eps = getattr(module, "eps", None)
    eps = torch.finfo(torch.float32).eps if eps is None else float(eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def bias_view(module: torch.nn.Module, bias: Tensor, out: Tensor) -> Tensor:
    """``bias`` shaped to add to the output ``out`` of ``module`` (channels last for Linear/norms, axis 1 for
    convolutions)."""
    if isinstance(module, torch.nn.Conv2d):
        return bias.reshape(1, -1, *([1] * (out.dim() - 2)))
    return bias


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
    if not isinstance(module, torch.nn.Conv2d):
        raise TypeError(f"a LoRA bypass needs a Linear or Conv2d, got {type(module).__name__}")
    kh, kw = module.kernel_size
    r = down.shape[0]
    up4 = up.reshape(up.shape[0], r, 1, 1)
    if mid is None:
        h = F.conv2d(x, down.reshape(r, -1, kh, kw), None, module.stride, module.padding, module.dilation)
    else:
        h = F.conv2d(x, down.reshape(r, -1, 1, 1))
        h = F.conv2d(h, mid, None, module.stride, module.padding, module.dilation)
    return F.conv2d(h, up4) * scale
