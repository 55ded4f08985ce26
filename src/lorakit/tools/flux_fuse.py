"""The parts of a FLUX.1 fused layer put back together as one LoRA, exactly, and a kohya ``split_qkv`` part made
compact again.

A fused BFL layer (``double_blocks.i.img_attn.qkv``, ``single_blocks.j.linear1``, ``final_layer.adaLN_modulation.1``)
is its diffusers parts stacked along the rows, in ``Fused.targets`` order (the final layer's two halves swapped).
Parts that are plain LoRAs (up (dᵢ, rᵢ), down (rᵢ, in), scale sᵢ = αᵢ/rᵢ) fuse without loss in two ways:

- **one down**: every part has the same ``down`` (bit for bit) and the same α and r — the parts of one fused LoRA
  (what a kohya file split and written in the diffusers layout holds). Fused: up = [up₁; …; upₙ], the same down
  and α: the tensors of the original file, bit for bit.
- **block-diagonal** (kohya's ``split_qkv`` layout): up = diag(up₁, …, upₙ) (Σdᵢ, Σrᵢ), down = [down₁; …; downₙ],
  α = s·Σrᵢ — exact only when every part has the same scale s and α/Σr gives s back to the last bit, because every
  loader (kohya's own included, ROUND3_NOTES R3) scales a fused layer by α/r of the file.

Anything else (LoHa, LoKr, DoRA, Tucker … on each part, scales that differ) has no fused form.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor
Leaves = dict[str, Tensor]
UP, DOWN, BIAS, MAG = "lora_up.weight", "lora_down.weight", "lora_up.bias", "dora_scale"
FUSABLE = {UP, DOWN, BIAS, MAG, "alpha", "scale"}


def swap_halves(t: Tensor) -> Tensor:
    """[a; b] → [b; a] along the rows (BFL's final adaLN is diffusers' ``norm_out.linear`` with its halves swapped)."""
    a, b = t.chunk(2)
    return torch.cat([b, a])


def scale_of(leaves: Leaves) -> float:
    """α/r of a LoRA layer's leaves (its ``scale`` key where it has one; 1 without α, as every reader)."""
    if "scale" in leaves:
        return float(leaves["scale"])
    if "alpha" in leaves:
        return float(leaves["alpha"]) / int(leaves[DOWN].shape[0])
    return 1.0


def fuse_parts(parts: Sequence[Leaves], swap: bool = False) -> tuple[Leaves | None, str]:
    """One LoRA for the fused layer whose parts (in row order) are ``parts``; ``(None, why)`` when there is none."""
    for leaves in parts:
        odd = sorted(set(leaves) - FUSABLE)
        if odd or DOWN not in leaves or UP not in leaves or leaves[DOWN].dim() != 2:
            return None, f"a part has {', '.join(odd[:3]) or 'no LoRA factors'} (only plain LoRA parts fuse)"
    mags = [p[MAG] for p in parts if MAG in p]
    if mags and (len(mags) < len(parts) or not all(_per_output(p) for p in parts)):
        return None, "a DoRA magnitude per input, or on some parts only, normalises across the parts"
    scales = {scale_of(p) for p in parts}
    if len(scales) > 1:
        return None, "its parts have different scales α/r (a fused layer has one)"
    if len({(p[UP].dtype, p[DOWN].dtype) for p in parts}) > 1:
        return None, "its parts are stored in different dtypes"
    down0 = parts[0][DOWN]
    shared = all(torch.equal(p[DOWN], down0) for p in parts[1:]) and \
        len({(tuple(sorted(k for k in p if k in ("alpha", "scale"))), _number(p)) for p in parts}) == 1
    fused = _one_down(parts) if shared else _block_diagonal(parts, scales.pop())
    if fused is None:
        return None, "α/r of the fused layer cannot give its parts' scale exactly"
    if any(BIAS in p for p in parts):
        fused[BIAS] = torch.cat([p[BIAS].flatten() if BIAS in p else p[UP].new_zeros(p[UP].shape[0]) for p in parts])
    if mags:  # per output row: each row's norm is its own, so the rows stack
        fused[MAG] = torch.cat(mags)
    for key in (UP, BIAS, MAG) if swap else ():
        if key in fused:
            fused[key] = swap_halves(fused[key])
    return fused, ""


def _per_output(leaves: Leaves) -> bool:
    mag = leaves[MAG]
    return mag.shape[0] == leaves[UP].shape[0] and (mag.dim() == 1 or mag[0].numel() == 1)


def _number(leaves: Leaves) -> float | None:
    key = "scale" if "scale" in leaves else "alpha" if "alpha" in leaves else None
    return None if key is None else float(leaves[key])


def _one_down(parts: Sequence[Leaves]) -> Leaves:
    out = {k: v for k, v in parts[0].items() if k in ("alpha", "scale")}
    return out | {UP: torch.cat([p[UP] for p in parts]), DOWN: parts[0][DOWN]}


def _block_diagonal(parts: Sequence[Leaves], s: float) -> Leaves | None:
    rank = sum(int(p[DOWN].shape[0]) for p in parts)
    alpha = s * rank
    if alpha / rank != s:
        return None
    dtype = next((p["alpha"].dtype for p in parts if "alpha" in p and p["alpha"].is_floating_point()),
                 torch.float32)
    stored = next((t for dt in (dtype, torch.float32) if float(t := torch.tensor(alpha, dtype=dt)) == alpha), None)
    if stored is None:
        return None
    return {UP: torch.block_diag(*[p[UP] for p in parts]), DOWN: torch.cat([p[DOWN] for p in parts]),
            "alpha": stored}


def compact(parts: Sequence[Leaves]) -> list[Leaves] | None:
    """The parts of a block-diagonal fused LoRA (each part's ``up`` nonzero in columns no other part uses: kohya's
    ``split_qkv`` files, or what ``fuse_parts`` made) each with only its own columns of ``up`` and rows of
    ``down``, α scaled so α/r stays the same to the last bit; ``None`` when the layer is not block-diagonal or the
    new α cannot be exact (then the parts are right as they are, only larger)."""
    if len(parts) < 2 or any(set(p) - FUSABLE or p[UP].dim() != 2 for p in parts):
        return None
    used = [p[UP].ne(0).any(0) for p in parts]
    if any(not bool(u.any()) for u in used) or int(torch.stack(used).sum(0).max()) > 1:
        return None
    out = []
    for leaves, cols in zip(parts, used):
        keep = cols.nonzero().flatten()
        new = {**leaves, UP: leaves[UP][:, keep].contiguous(), DOWN: leaves[DOWN][keep].contiguous()}
        if "alpha" in leaves and "scale" not in leaves:
            r, k = int(leaves[DOWN].shape[0]), int(keep.numel())
            alpha = float(leaves["alpha"]) * k / r
            new["alpha"] = torch.tensor(alpha, dtype=leaves["alpha"].dtype)
            if float(new["alpha"]) != alpha or alpha / k != float(leaves["alpha"]) / r:
                return None
        out.append(new)  # no α: α = r is implied before and after (scale 1); a ``scale`` key stays as it is
    return out
