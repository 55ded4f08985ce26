"""On CUDA (skipped without it): apply/switch/restore bit-exact with originals on the device and on the host, the
one-GEMM path against an fp32 reference, and generation in fp16 and bf16 — also with model CPU offload."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import LoraIndex
from lorakit.models.loading import load_model
from lorakit.patch import patcher_for
from lorakit.patch.targets import find_module

from .conftest import assert_original, snapshot
from .factories import make_kohya_lora, tiny_components

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"
HALF = [torch.float16, torch.bfloat16]
MIXED = ["lora", "loha", "dora-out", "full", "oft", "ia3", "locon-tucker", "lokr", "boft", "glora"]


def _cuda(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    return {k: v.to("cuda") for k, v in tiny_components("sd1", dtype=dtype).items()}


def _lora(c: dict[str, torch.nn.Module], kind: object, seed: int) -> lorakit.LoraModel:
    sd = make_kohya_lora(c, kind, seed=seed, dtype=torch.float16)  # made on the CPU, as a file would be
    return lorakit.lora_from_state_dict(sd, {}, name=f"l{seed}")


def _host_placed_factors(lora: lorakit.LoraModel, c: dict[str, torch.nn.Module]) -> list[torch.Tensor]:
    """The factor tensors of ``lora`` as host mode places them (patch/placement.py; scalars left out)."""
    from lorakit.patch import placement
    placed = placement.place_loras([(lora, 1.0)], c, "fused", host=True)[0][0]
    return [t for a in placed.layers.values() for k, t in placement._tensors(a) if not placement._keeps(k, t)]


def _mixed(path: str) -> str:
    return MIXED[sum(map(ord, path)) % len(MIXED)]


@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
@pytest.mark.parametrize("where", ["device", "host"])
def test_cuda_apply_switch_restore_bit_exact(dtype: torch.dtype, where: str) -> None:
    c = _cuda(dtype)
    snap = snapshot(c)
    a, b = _lora(c, _mixed, 1), _lora(c, "lora", 2)
    patcher = patcher_for(c)
    patcher.fused.originals_mode = where
    for i in range(20):
        patcher.set([(a, 0.8), (b, 0.5)])
        assert patcher.originals_location == where
        assert all(p.device.type == "cuda" for m in c.values() for p in m.parameters())
        if where == "host":
            assert all(t.device.type == "cpu" and t.is_pinned() for t in patcher.fused.host.values())
            assert all(t.device.type == "cpu" and t.is_pinned() for t in _host_placed_factors(a, c))
        patcher.set([(b, -1.0)], mode="hooks" if i % 3 == 0 else "fused")
        patcher.restore()
        assert_original(c, snap)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cuda_fused_matches_the_cpu_fp32_reference(dtype: torch.dtype) -> None:
    """fp32 sums on the device, cast once: within one rounding of the same sum done on the CPU in fp32."""
    c = _cuda(dtype)
    a, b = _lora(c, "lora", 1), _lora(c, _mixed, 2)
    before = {p: find_module(c, p).weight.detach().clone() for p in a.layers}  # type: ignore[union-attr]
    with lorakit.apply_loras(c, [(a, 0.8), (b, -0.5)]):
        for path, w0 in before.items():
            w32 = w0.cpu().float()
            ref = w32.clone()
            for lora, s in ((a, 0.8), (b, -0.5)):
                if path in lora.layers:
                    ref += lora.layers[path].delta(w32, s)  # every ΔW from the original W, as fused does
            got = find_module(c, path).weight.detach().cpu().float()  # type: ignore[union-attr]
            ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
            torch.testing.assert_close(got, ref.to(dtype).float(), rtol=2 * ulp, atol=1e-4)


@pytest.mark.parametrize("graphs", [False, True], ids=["prepared-list", "cuda-graph"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cuda_recorded_switch_equals_the_eager_switch_bit_for_bit(dtype: torch.dtype, graphs: bool) -> None:
    """patch/recorded.py: a set's switch recorded (a prepared addmm list, or a CUDA graph) and replayed lands
    exactly where the eager switch lands (fp16: recorded; bf16: refused, eager), across switches between recorded
    sets, and restores exactly."""
    import copy

    from lorakit.patch import Patcher
    from lorakit.patch.recorded import RecordedSwitches

    c = _cuda(dtype)
    snap = snapshot(c)
    recorded, eager = Patcher(c), Patcher(copy.deepcopy(c))
    recorded.fused.recorded = RecordedSwitches(graphs=graphs)
    eager.fused.recorded = RecordedSwitches(enabled=False)
    for p in (recorded, eager):
        p.fused.originals_mode = "device"
    a, b, x, y = (_lora(c, "lora", i) for i in (1, 2, 3, 4))
    # x, y in between: the factors made for a's recording are not kept by the eager switch any more, and the
    # allocator hands their memory to others — a recording that did not hold them would read those
    for s in ([(a, 1.0)], [(b, 0.7)], [(a, 1.0)], [(b, 0.7)], [(a, 1.0), (b, -0.5)], [(a, 1.0)],
              [(a, 1.0), (b, -0.5)], [(a, 1.0), (b, -0.5)], [(b, 0.7)], [(x, 1.0)], [(y, 1.0)], [(a, 1.0)],
              [(x, 1.0)], [(y, 1.0)], [(a, 1.0)], [(b, 0.7)]):
        recorded.set(s, log_reports=False)
        eager.set(s, log_reports=False)
        for name, m in c.items():
            for (n, x), y in zip(m.named_parameters(), eager.components[name].parameters()):
                assert torch.equal(x, y), f"{name}.{n} after {[(lo.name, w) for lo, w in s]}"
    made = recorded.fused.recorded.recordings
    assert made >= 5 if dtype == torch.float16 else made == 0  # a, b, a+b, x, y (again when evicted)
    assert recorded.fused.recorded.graphs_captured == (made if graphs else 0)
    recorded.restore()
    assert_original(c, snap)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cuda_host_mode_keeps_no_lora_memory_on_the_card(dtype: torch.dtype) -> None:
    """Originals on the host (the low-memory choice): the factors stay in host memory and each layer's are moved
    only for its sum, so after a switch the card holds the bare model's bytes; the weights equal device mode's."""
    c = _cuda(dtype)
    a, b = _lora(c, _mixed, 1), _lora(c, "lora", 2)
    with lorakit.apply_loras(c, [(a, 0.8), (b, 0.5)]):  # device mode: the reference weights
        want = {n: p.detach().clone() for n, p in c["unet"].named_parameters()}
    patcher = patcher_for(c)
    patcher.fused.originals_mode = "host"
    torch.cuda.synchronize()
    bare = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    patcher.set([(a, 0.8), (b, 0.5)])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - bare <= 1 << 20, "nothing of the LoRAs stays on the card"
    largest = max(p.numel() * 4 for m in c.values() for p in m.parameters())  # one layer's fp32 sum, at most
    assert torch.cuda.max_memory_allocated() - bare <= largest + (16 << 20)
    for name, p in c["unet"].named_parameters():
        assert torch.equal(p.detach(), want[name]), name
    patcher.restore()
    patcher.fused.originals_mode = "auto"


def test_cuda_auto_keeps_the_originals_on_the_device_when_they_fit() -> None:
    c = _cuda(torch.float16)
    with lorakit.apply_loras(c, [_lora(c, "lora", 1)]) as applied:
        assert applied.patcher.originals_location == "device"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("vram", ["normal", "low"])
def test_cuda_generation_with_a_lora(dtype: str, vram: str) -> None:
    model = load_model(None, device="cuda", dtype=dtype, vram=vram)
    assert model.device.type == "cuda" and model.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    comps = {"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder}
    snap = {k: v.cpu() for k, v in snapshot(comps).items()}  # with vram low the weights move between uses
    gen = Generator(model, LoraIndex([EXAMPLES]))
    try:
        req = Request("a cat <lora:demo_style:0.8>", steps=3, width=64, height=64, seed=5)
        first = np.asarray(gen(req).images[0])
        assert np.array_equal(first, np.asarray(gen(req).images[0]))  # same request, same device: same image
        scheduled = Request("a cat <lora:demo_style:te=1:unet=0@0,1@1>", steps=3, width=64, height=64, seed=5)
        assert not np.array_equal(first, np.asarray(gen(scheduled).images[0]))  # hooks on the device
    finally:
        gen.close()
    for c, m in comps.items():
        assert all(torch.equal(p.detach().cpu(), snap[f"{c}.{n}"]) for n, p in m.named_parameters()), c


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_training_in_half_precision(dtype: str, tmp_path: Path) -> None:
    """A few mixed-precision steps on CUDA (fp16 with a gradient scaler, bf16 without): finite losses, fp32
    parameters that moved, and a file that applies."""
    from PIL import Image

    from lorakit.train.loop import TrainConfig, Trainer
    from lorakit.train.network import NetworkSpec

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (20 * i, 30, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a blue square")
    model = load_model(None, device="cuda", dtype=dtype)
    out = tmp_path / "l.safetensors"
    trainer = Trainer(TrainConfig(data, out, network=NetworkSpec("locon", 4, 2.0), steps=5, lr=1e-3), model)
    trainer.run(progress=False)
    assert all(np.isfinite(trainer.losses)) and len(trainer.losses) == 5
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainer.net.parameters())
    assert any(float(p.detach().abs().max()) > 0 for p in trainer.net.parameters())
    with lorakit.apply_loras(model.pipe, [(out, 1.0)]) as applied:
        assert applied.reports[0].patched
