"""LoRAs on the device: factors placed once per (LoRA, device, dtype); originals kept on the device or on the host
(both code paths run here, on the CPU); every dtype applies, switches and restores bit-exactly in both places; the
CUDA one-GEMM path, forced onto the CPU, sums in fp32 and rounds once."""
from __future__ import annotations

import gc
import random

import pytest
import torch

import lorakit
from lorakit.patch import fused, originals, patcher_for
from lorakit.patch.placement import cached_count, lora_on
from lorakit.patch.targets import find_module

from .conftest import assert_original, snapshot
from .factories import make_kohya_lora, tiny_components

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MIXED = ["lora", "loha", "dora-out", "full", "ia3", "locon-tucker", "lokr"]  # low-rank, whole, ΔW reading W


def _lora(c: dict[str, torch.nn.Module], kind: object, seed: int = 0, dtype: torch.dtype = torch.float16,
          **kw: object) -> lorakit.LoraModel:
    return lorakit.lora_from_state_dict(make_kohya_lora(c, kind, seed=seed, dtype=dtype, **kw), {}, name=f"l{seed}")


def _mixed(path: str) -> str:
    return MIXED[sum(map(ord, path)) % len(MIXED)]


def test_factors_move_once_per_device_and_dtype_and_go_with_the_lora() -> None:
    c = tiny_components("sd1")
    lora = _lora(c, _mixed, dtype=torch.float16)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    placed = lora_on(lora, {"unet": meta, "text_encoder": cpu})  # meta: a second device on a CPU-only machine
    assert placed is not lora and lora_on(lora, {"unet": meta, "text_encoder": cpu}) is placed
    for path, adapter in placed.layers.items():
        want = meta if path.startswith("unet") else cpu
        tensors = dict(adapter.t, **getattr(getattr(adapter, "inner", None), "t", {}))
        for key, t in tensors.items():
            if key in ("alpha", "scale") or t.dim() == 0:
                assert t.device == cpu, (path, key)  # read as numbers: no device sync
            else:
                assert t.device == want and t.dtype == torch.float32, (path, key)
    assert all(t.dtype == torch.float16 for a in lora.layers.values() for t in a.t.values() if t.dim() > 1)
    fp32 = _lora(c, "lora", dtype=torch.float32)
    assert lora_on(fp32, {"unet": cpu, "text_encoder": cpu}) is fp32  # nothing to convert: no copy
    before = cached_count()
    del lora, placed
    gc.collect()
    assert cached_count() == before - 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_and_device_originals_patch_identically_and_restore_exactly(dtype: torch.dtype) -> None:
    seen = {}
    for where in ("device", "host"):
        c = tiny_components("sd1", dtype=dtype)
        snap = snapshot(c)
        a, b = _lora(c, _mixed, seed=1, dtype=dtype), _lora(c, "lora", seed=2)
        patcher = patcher_for(c)
        patcher.fused.originals_mode = where
        ptr = c["unet"].conv_in.weight.data_ptr()
        patcher.set([(a, 0.8), (b, {"unet": 0.5, "te": 1.2})])
        assert patcher.originals_location == where
        assert (c["unet"].conv_in.weight.data_ptr() == ptr) == (where == "host")  # host: patched in place
        first = snapshot(c)
        patcher.set([(b, -0.7)])  # a switch: parameters only `a` touched go back, the others are recomputed
        second = snapshot(c)
        patcher.set([(a, 0.8), (b, {"unet": 0.5, "te": 1.2})])
        assert all(torch.equal(v, first[k]) for k, v in snapshot(c).items())
        patcher.restore()
        assert_original(c, snap)
        assert patcher.originals_location == "none" and c["unet"].conv_in.weight.data_ptr() == ptr
        seen[where] = (first, second)
    for i in range(2):
        assert all(torch.equal(v, seen["host"][i][k]) for k, v in seen["device"][i].items())


def test_random_cycles_with_originals_split_between_device_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` on a device that can hold only some originals: both places at once, through 150 random
    apply/switch/restore cycles in fused and hooks mode; every weight back at the end. (Each dtype's in-place
    paths are held bit-exact by the test above.)"""
    dtype = torch.float16
    c = tiny_components("sd1", dtype=dtype)
    touched = sum(p.numel() * p.element_size() for m in c.values() for p in m.parameters())
    monkeypatch.setattr(originals, "free_bytes", lambda d: touched // 3)
    monkeypatch.setattr(originals, "total_bytes", lambda d: touched)
    monkeypatch.setattr(originals, "HEADROOM_BYTES", 0)
    monkeypatch.setattr(originals, "HEADROOM_SHARE", 0.0)
    snap = snapshot(c)
    loras = [_lora(c, kind, seed=i, dtype=dtype) for i, kind in enumerate(["lora", "dora-out", _mixed])]
    rnd = random.Random(3)
    patcher = patcher_for(c)
    places = set()
    for _ in range(150):
        if rnd.random() < 0.15:
            patcher.restore()
            continue
        spec = [(lo, rnd.choice([1.0, 0.5, -0.3, 0.0, {"unet": 0.7, "te": 0.0}])) for lo in
                rnd.sample(loras, rnd.randint(1, 3))]
        patcher.set(spec, mode="hooks" if rnd.random() < 0.2 else "fused")
        places.add(patcher.originals_location)
    assert "device+host" in places
    patcher.restore()
    assert_original(c, snap)


def test_auto_keeps_originals_on_the_device_while_they_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    params = {i: torch.zeros(256, dtype=torch.float16) for i in range(4)}  # 512 bytes each
    assert set(originals.choose_places(params, "auto").values()) == {"device"}  # CPU: no limit
    monkeypatch.setattr(originals, "free_bytes", lambda d: (2 << 30) + 1100)
    monkeypatch.setattr(originals, "total_bytes", lambda d: 8 << 30)
    places = originals.choose_places(params, "auto")  # 2 GiB stay free (> 15 % of 8 GiB): room for two
    assert list(places.values()) == ["device", "device", "host", "host"]
    assert "2 on cpu (0.0 MiB), 2 on host memory" in originals.describe_places(params, places, "auto")
    assert set(originals.choose_places(params, "host").values()) == {"host"}
    with pytest.raises(lorakit.LorakitError, match="lora_originals must be one of auto, device, host"):
        originals.choose_places(params, "gpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["device", "host"])
def test_gemm_path_sums_in_fp32_and_rounds_once(dtype: torch.dtype, where: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (one addmm per weight, factors side by side along the rank), run on the CPU; bf16 weights take
    the exact fp32 row-block path instead (bf16 factors would round ΔW by more than the weight's own rounding)."""
    monkeypatch.setattr(fused, "GEMM_DEVICES", {"cpu"})
    calls: list[bool] = []
    real = fused.FusedPatcher._sum_gemm

    def spy(self: fused.FusedPatcher, *a: object) -> bool:
        calls.append(real(self, *a))  # type: ignore[arg-type]
        return calls[-1]
    monkeypatch.setattr(fused.FusedPatcher, "_sum_gemm", spy)
    c = tiny_components("sd1", dtype=dtype)
    snap = snapshot(c)
    a, b = _lora(c, "lora", seed=1), _lora(c, "lora", seed=2)
    modules = {path: find_module(c, path) for path in a.layers}
    before = {path: m.weight.detach().clone() for path, m in modules.items()}  # type: ignore[union-attr]
    patcher = patcher_for(c)
    patcher.fused.originals_mode = where
    patcher.set([(a, 0.8), (b, -0.5)])
    assert calls and all(calls) == (dtype == torch.float16) and any(calls) == (dtype == torch.float16)  # bf16: rows
    for path, module in modules.items():
        ref = before[path].float().flatten(1)
        for lora, s in ((a, 0.8), (b, -0.5)):
            up, down, scale = lora.layers[path].low_rank()  # type: ignore[misc]
            ref = ref + (scale * s) * (up.float() @ down.float())
        got = module.weight.detach().float().flatten(1)  # type: ignore[union-attr]
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        torch.testing.assert_close(got, ref.to(dtype).float(), rtol=ulp, atol=ulp * ref.abs().max().item())
    patcher.restore()
    assert_original(c, snap)


def test_host_placed_factors_move_to_the_weights_device_only_for_a_sum() -> None:
    """``on_device``: the adapter itself when its factors are where the weight is; else a copy there (``meta``
    stands in for a GPU), the host-placed adapter untouched — so fused sums with originals on the host leave no
    factors on the card (checked on CUDA in test_gpu)."""
    from lorakit.adapters import build_adapter
    from lorakit.patch.placement import on_device

    from .factories import adapter_tensors

    adapter, _ = build_adapter(adapter_tensors("lora", (36, 24)), "x")
    assert on_device(adapter, torch.device("cpu")) is adapter
    moved = on_device(adapter, torch.device("meta"))
    assert moved is not adapter
    assert all(t.device.type == "meta" for k, t in moved.t.items() if t.dim() > 0)
    assert all(t.device.type == "cpu" for t in adapter.t.values())
