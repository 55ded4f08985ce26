"""Host copies of tensors, pinned and packed when CUDA is there.

Pinned (page-locked) host memory is what lets a host→device copy run asynchronously at full PCIe speed, so the
originals kept on the host and the host-placed LoRA factors live there. But torch's pinned-memory allocator rounds
every allocation up to a power of two (``CachingHostAllocator``: ``PowerOf2Ceil``, unless the user raised
``pinned_max_round_threshold``): one allocation per tensor costs up to twice the bytes — 1.26–1.54× for the
originals and factors of SD1.5/SDXL. So the copies of one call are packed, largest first, into shared chunks whose
sizes are powers of two: ``CHUNK_BYTES`` while that much is left to place, then the largest power of two the rest
fills, so the tail is cut into a few smaller chunks instead of rounded up. A chunk is freed when every copy in it
is: copies that go together (a LoRA's factors; the originals of one model block) share a ``group``, and only
copies of one group share a chunk.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

CHUNK_BYTES = 1 << 26  # 64 MiB, a power of two
ALIGN = 512  # bytes: every copy starts on a 512-byte boundary (any dtype's alignment, DMA-friendly)
Placement = tuple[int, int]  # (chunk, byte offset)


def host_copies(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None, pin: bool | None = None,
                groups: Sequence[Hashable] | None = None) -> list[torch.Tensor]:
    """Contiguous host copies of ``tensors`` (cast to ``dtype`` when given, else bit-exact); pinned and packed per
    group (``pin``, default: when CUDA is available), else each its own plain allocation. A copy from a CUDA tensor
    is queued on the current stream (not waited for): what reads it must be ordered after it on that stream — a
    copy back to the device is; a read on the CPU needs a ``torch.cuda.synchronize()`` first."""
    if pin is None:
        pin = torch.cuda.is_available()
    dtypes = [dtype or t.dtype for t in tensors]
    if not pin:
        return [torch.empty(t.shape, dtype=dt).copy_(t) for t, dt in zip(tensors, dtypes)]
    sizes = [t.numel() * dt.itemsize for t, dt in zip(tensors, dtypes)]
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups if groups is not None else [None] * len(tensors)):
        members.setdefault(group, []).append(i)
    out: dict[int, torch.Tensor] = {}
    for indices in members.values():
        chunk_sizes, places = pack([sizes[i] for i in indices])
        chunks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size in chunk_sizes]
        for i, (chunk, offset) in zip(indices, places):
            t = tensors[i]
            copy = chunks[chunk][offset:offset + sizes[i]].view(dtypes[i]).view(t.shape)
            out[i] = copy.copy_(t, non_blocking=t.device.type == "cuda")
    return [out[i] for i in range(len(tensors))]


def pack(sizes: Sequence[int]) -> tuple[list[int], list[Placement]]:
    """First-fit decreasing: the chunk sizes (powers of two) and where each of ``sizes`` goes. A new chunk holds
    ``CHUNK_BYTES``, or less when less is left to place (the largest power of two that the rest fills), or one
    larger tensor rounded up; each is cut to the power of two that holds what it got."""
    capacity: list[int] = []
    used: list[int] = []
    places: list[Placement] = [(0, 0)] * len(sizes)
    left = sum(_aligned(s) for s in sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = _aligned(sizes[i])
        chunk = next((c for c in range(len(capacity)) if capacity[c] - used[c] >= need), len(capacity))
        if chunk == len(capacity):
            capacity.append(max(power_of_two(need), min(CHUNK_BYTES, 1 << max(0, left.bit_length() - 1))))
            used.append(0)
        places[i] = (chunk, used[chunk])
        used[chunk] += need
        left -= need
    return [power_of_two(u) for u in used], places


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def power_of_two(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for 0)."""
    return 1 << max(0, n - 1).bit_length()
