"""Host copies packed into power-of-two pinned chunks (models/host_memory.py): torch's pinned allocator rounds every
allocation up to a power of two, so one allocation per tensor would cost up to twice the bytes."""
from __future__ import annotations

import random

import pytest
import torch

from lorakit.models import host_memory
from lorakit.models.host_memory import ALIGN, CHUNK_BYTES, host_copies, pack, power_of_two


@pytest.mark.parametrize("seed", range(5))
def test_packing_fits_without_overlap_in_power_of_two_chunks(seed: int) -> None:
    rnd = random.Random(seed)
    # LoRA factors (KiB to a few MiB), a few large originals (up to 100 MiB: larger than a chunk), zero-size ones
    sizes = [rnd.choice([0, rnd.randrange(1, 4096), rnd.randrange(1 << 12, 1 << 22), rnd.randrange(1 << 22, 1 << 25)])
             for _ in range(rnd.randrange(1, 400))] + [rnd.randrange(1 << 25, 100 << 20) for _ in range(seed)]
    chunks, places = pack(sizes)
    assert all(c == power_of_two(c) for c in chunks)
    spans: dict[int, list[tuple[int, int]]] = {}
    for size, (chunk, offset) in zip(sizes, places):
        assert offset % ALIGN == 0 and offset + size <= chunks[chunk]
        spans.setdefault(chunk, []).append((offset, offset + size))
    for items in spans.values():
        items.sort()
        assert all(a[1] <= b[0] for a, b in zip(items, items[1:])), "two copies overlap"
    aligned = sum(-(-s // ALIGN) * ALIGN for s in sizes)
    # all but the last chunk (nearly) full: what is lost is the last chunk's rounding, not a rounding per tensor
    assert sum(chunks) <= aligned + max(CHUNK_BYTES, max(sizes)) + len(chunks) * (4 << 20)


def test_power_of_two() -> None:
    assert [power_of_two(n) for n in (0, 1, 2, 3, 4, 5, 1023, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]


def test_plain_copies_are_exact_and_independent() -> None:
    ts = [torch.randn(3, 5, dtype=torch.float16), torch.randn(7, dtype=torch.bfloat16),
          torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last), torch.empty(0)]
    copies = host_copies(ts, pin=False)
    for t, c in zip(ts, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t)
        assert c.numel() == 0 or c.data_ptr() != t.data_ptr()
    assert [c.dtype for c in host_copies(ts[:1], dtype=torch.float32, pin=False)] == [torch.float32]


def test_pinned_copies_share_chunks_and_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned path on a machine without CUDA: ``pin_memory`` dropped, everything else as on a GPU machine."""
    empty = torch.empty
    made: list[int] = []

    def unpinned(*args: object, pin_memory: bool = False, **kwargs: object) -> torch.Tensor:
        t = empty(*args, **kwargs)  # type: ignore[call-overload]
        made.append(t.numel())
        return t

    monkeypatch.setattr(host_memory.torch, "empty", unpinned)
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, 33, generator=gen).to(dt) for n, dt in
          [(1, torch.float16), (100, torch.float32), (7, torch.bfloat16), (3000, torch.float16), (0, torch.float32)]]
    ts.append(torch.randn(2, 8, 3, 3, generator=gen).to(memory_format=torch.channels_last))
    copies = host_copies(ts, pin=True)
    assert len(made) == 1 and made[0] == power_of_two(sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN
                                                        for t in ts))
    for t, c in zip(ts, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1  # one chunk
    as_fp32 = host_copies(ts[:2], dtype=torch.float32, pin=True)
    assert all(c.dtype == torch.float32 and torch.equal(c, t.float()) for c, t in zip(as_fp32, ts))
