"""Host copies of tensors, pinned and packed when CUDA is there.

Pinned (page-locked) host memory is what lets a host→device copy run asynchronously at full PCIe speed, so the
originals kept on the host and the host-placed LoRA factors live there. But torch's pinned-memory allocator rounds
every allocation up to a power of two (``CachingHostAllocator``: ``PowerOf2Ceil``, unless the user raised
``pinned_max_round_threshold``): one allocation per tensor costs up to twice the bytes — ~1.4× for a LoRA's
factors. So the copies of one call are packed, largest first, into shared chunks whose sizes are powers of two
(``CHUNK_BYTES``, or one tensor's size rounded up when it is larger), each chunk cut to the power of two that holds
what it got: all but the last chunk of a call are nearly full. A chunk is freed when every copy in it is.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_BYTES = 1 << 26  # 64 MiB, a power of two
ALIGN = 512  # bytes: every copy starts on a 512-byte boundary (any dtype's alignment, DMA-friendly)
Placement = tuple[int, int]  # (chunk, byte offset)


def host_copies(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
                pin: bool | None = None) -> list[torch.Tensor]:
    """Bit-exact contiguous host copies of ``tensors`` (cast to ``dtype`` when given); pinned and packed
    (``pin``, default: when CUDA is available), else each its own plain allocation."""
    if pin is None:
        pin = torch.cuda.is_available()
    dtypes = [dtype or t.dtype for t in tensors]
    if not pin:
        return [torch.empty(t.shape, dtype=dt).copy_(t) for t, dt in zip(tensors, dtypes)]
    sizes = [t.numel() * dt.itemsize for t, dt in zip(tensors, dtypes)]
    chunk_sizes, places = pack(sizes)
    chunks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size in chunk_sizes]
    out = []
    for t, dt, size, (chunk, offset) in zip(tensors, dtypes, sizes, places):
        copy = chunks[chunk][offset:offset + size].view(dt).view(t.shape)
        copy.copy_(t, non_blocking=t.device.type == "cuda")  # stream-ordered: what reads it comes after
        out.append(copy)
    return out


def pack(sizes: Sequence[int]) -> tuple[list[int], list[Placement]]:
    """First-fit decreasing: the chunk sizes (powers of two) and where each of ``sizes`` goes."""
    capacity: list[int] = []
    used: list[int] = []
    places: list[Placement] = [(0, 0)] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = -(-sizes[i] // ALIGN) * ALIGN
        chunk = next((c for c in range(len(capacity)) if capacity[c] - used[c] >= need), len(capacity))
        if chunk == len(capacity):
            capacity.append(max(CHUNK_BYTES, power_of_two(need)))
            used.append(0)
        places[i] = (chunk, used[chunk])
        used[chunk] += need
    return [power_of_two(u) for u in used], places


def power_of_two(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for 0)."""
    return 1 << max(0, n - 1).bit_length()
