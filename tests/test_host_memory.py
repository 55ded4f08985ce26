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
    assert sum(chunks) <= sum(power_of_two(s) for s in sizes) + ALIGN * len(sizes)  # never worse than one each


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
    aligned = sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in ts)
    per_tensor = sum(power_of_two(t.numel() * t.element_size()) for t in ts)  # one allocation each
    assert all(n == power_of_two(n) for n in made) and aligned <= sum(made) <= per_tensor
    for t, c in zip(ts, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
    assert len({c.untyped_storage().data_ptr() for c in copies}) == len(made)  # each chunk holds copies
    as_fp32 = host_copies(ts[:2], dtype=torch.float32, pin=True)
    assert all(c.dtype == torch.float32 and torch.equal(c, t.float()) for c, t in zip(as_fp32, ts))
    made.clear()
    grouped = host_copies(ts, pin=True, groups=["a", "b", "a", "b", "a", "b"])
    by_chunk: dict[int, set[str]] = {}
    for c, g in zip(grouped, ["a", "b", "a", "b", "a", "b"]):
        by_chunk.setdefault(c.untyped_storage().data_ptr(), set()).add(g)
    assert all(len(g) == 1 for g in by_chunk.values())  # groups never share a chunk: each is freed on its own
    assert all(torch.equal(c, t) for c, t in zip(grouped, ts))


def test_originals_are_grouped_by_what_sets_drop_together() -> None:
    """The text encoders, each UNet block and its 3×3 convolutions pack apart (patch/fused.py): a switch to a set
    without the text encoder, without some blocks (block weights) or without LoCon's convolutions frees whole
    chunks."""
    from lorakit.patch.fused import _restored_together
    from tests.factories import tiny_components

    comps = tiny_components("sdxl")
    groups = {}
    for name, module in comps.items():
        for path, m in module.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                groups[f"{name}.{path}"] = _restored_together((f"{name}.{path}", "weight"), m.weight)
    te = {g for p, g in groups.items() if p.startswith("text_encoder.")}
    te2 = {g for p, g in groups.items() if p.startswith("text_encoder_2.")}
    assert len(te) == 1 and len(te2) == 1 and te != te2
    down0 = {g for p, g in groups.items() if p.startswith("unet.down_blocks.0.")}
    down1 = {g for p, g in groups.items() if p.startswith("unet.down_blocks.1.")}
    assert down0 and down1 and not down0 & down1
    conv = groups["unet.down_blocks.0.resnets.0.conv1"]
    assert conv[-1] == "conv" and conv != groups.get("unet.down_blocks.1.attentions.0.proj_in", conv[:-1] + ("",))


def test_host_placed_factors_are_cast_straight_into_pinned_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """patch/placement.py with ``pin`` (originals on the host, model on CUDA): each fp16 factor becomes one fp32
    copy in the LoRA's pinned chunks (no pageable fp32 copy first), nested adapters too; the LoRA itself is left
    as it was."""
    from lorakit.lora_model import lora_from_state_dict
    from lorakit.patch import placement
    from tests.factories import make_kohya_lora, tiny_components

    empty = torch.empty
    made: list[int] = []

    def unpinned(*args: object, pin_memory: bool = False, **kwargs: object) -> torch.Tensor:
        t = empty(*args, **kwargs)  # type: ignore[call-overload]
        if pin_memory:
            made.append(t.numel())
        return t

    comps = tiny_components("sd1")
    lora = lora_from_state_dict(make_kohya_lora(comps, "dora-out", dtype=torch.float16), {}, name="d")
    before = {(p, k): t for p, a in lora.layers.items() for k, t in placement._tensors(a)}
    monkeypatch.setattr(host_memory.torch, "empty", unpinned)
    cpu = {name: torch.device("cpu") for name in comps}
    placed = placement.lora_on(lora, cpu, pin=True)
    monkeypatch.undo()
    after = {(p, k): t for p, a in placed.layers.items() for k, t in placement._tensors(a)}
    moved = [key for key, t in before.items() if not placement._keeps(key[1], t)]
    assert moved and made and len(made) < len(moved) / 4  # packed, not one allocation per factor
    storages = {after[key].untyped_storage().data_ptr() for key in moved}
    assert len(storages) == len(made)
    for key in moved:
        assert after[key].dtype == torch.float32 and torch.equal(after[key], before[key].float())
    assert all(t is before[(p, k)] for p, a in lora.layers.items() for k, t in placement._tensors(a))
    placement.clear_cache()
