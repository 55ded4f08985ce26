"""Device and dtype: resolving ``auto``/names, loading models in fp16/bf16/fp32, VRAM modes, and the CLI flags —
all on the CPU (CUDA runs are in ``test_gpu.py``)."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import lorakit
from lorakit.cli import main
from lorakit.errors import DeviceError
from lorakit.models import device as dev
from lorakit.models.loading import BaseModel, _move, load_model

from .conftest import assert_original, snapshot

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"
HALF = [torch.float16, torch.bfloat16]


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    assert dev.resolve_device(None) == torch.device("mps")
    assert dev.resolve_dtype(None, torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("CUDA:1") == torch.device("cuda:1")
    assert dev.resolve_dtype("auto", torch.device("cuda:1")) == torch.float16
    with pytest.raises(DeviceError, match=r"device cuda:2 is not available on this machine; available: cuda:0, "
                                          r"cuda:1, mps, cpu"):
        dev.resolve_device("cuda:2")


@pytest.mark.parametrize("spec, msg", [("gpu", "unknown device 'gpu'"), ("mps:1", "unknown device"),
                                       ("cpu:0", "unknown device"), ("cuda", "device cuda is not available")])
def test_bad_or_missing_device_is_one_clear_line(spec: str, msg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=msg) as e:
        dev.resolve_device(spec)
    assert "\n" not in str(e.value)


def test_dtype_names_and_aliases() -> None:
    cpu = torch.device("cpu")
    assert [dev.resolve_dtype(n, cpu) for n in ("fp16", "half", "bf16", "BFloat16", "fp32", torch.bfloat16)] == \
        [torch.float16, torch.float16, torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16]
    for bad in ("int8", "fp8", torch.float64):
        with pytest.raises(DeviceError, match="fp16, bf16, fp32"):
            dev.resolve_dtype(bad, cpu)
    assert dev.dtype_name(torch.bfloat16) == "bf16"


def test_cli_device_not_there_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "a cat", "--device", "cuda", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit: error: device cuda is not available") and "available: " in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cli_generates_in_half_precision_on_the_cpu_with_a_lora(dtype: str, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "x.png"
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert main(["generate", "a cat <lora:demo_style:0.8>", "-l", str(EXAMPLES), "--dtype", dtype,
                     "--device", "cpu", "--steps", "1", "-W", "64", "-H", "64", "--seed", "3", "-o", str(out)]) == 0
    assert f"model demo on cpu, {dtype}, vram normal" in caplog.text
    assert "LoRA demo_style" in caplog.text
    px = np.asarray(Image.open(out))
    assert px.shape == (64, 64, 3) and px.std() > 1  # an image, not a constant (black) one


@pytest.fixture(scope="module", params=HALF, ids=str)
def half_demo(request: pytest.FixtureRequest) -> BaseModel:
    return load_model(None, device="cpu", dtype=request.param)


def _unet_out(model: BaseModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g).to(model.dtype)
    ctx = torch.randn(1, 7, 64, generator=g).to(model.dtype)
    with torch.no_grad():
        return model.pipe.unet(x, 10, encoder_hidden_states=ctx).sample


def test_half_model_loads_in_its_dtype_and_a_lora_restores_bit_exactly(half_demo: BaseModel) -> None:
    pipe = half_demo.pipe
    for name in ("unet", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {half_demo.dtype}, name
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    snap, base = snapshot(comps), _unet_out(half_demo)
    with lorakit.apply_loras(pipe, [(EXAMPLES / "demo_style.safetensors", 0.8)]):
        assert {p.dtype for p in pipe.unet.parameters()} == {half_demo.dtype}  # patched in the model's dtype
        assert not torch.equal(_unet_out(half_demo), base)
    assert_original(comps, snap)
    assert torch.equal(_unet_out(half_demo), base)


def test_vram_modes_and_vae_tiling(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_DTYPE", "bf16")  # arguments left None come from the environment
    monkeypatch.setenv("LORAKIT_VRAM", "high")
    with caplog.at_level(logging.INFO, logger="lorakit"):
        low = load_model(None, device="cpu", vram="low")
    assert "model CPU offload needs CUDA, so it is ignored on cpu" in caplog.text
    assert "model demo on cpu, bf16, vram low" in caplog.text and low.dtype == torch.bfloat16
    assert low.vram == "low" and low.vae_tiling and low.vae_tiling_for(64, 64)
    low.vram = "normal"
    assert not low.vae_tiling_for(1024, 1024) and low.vae_tiling_for(1536, 512)
    assert low.set_vae_tiling(512, 512) is False and not low.vae_tiling
    assert low.set_vae_tiling(512, 2048) is True and low.vae_tiling
    low.vram = "high"
    assert not low.vae_tiling_for(2048, 2048)
    with pytest.raises(DeviceError, match="vram must be one of low, normal, high, got 'huge'"):
        load_model(None, vram="huge")
    with pytest.raises(DeviceError, match="lora_originals must be one of auto, device, host"):
        load_model(None, lora_originals="gpu")


def test_models_keep_their_declared_fp32_modules() -> None:
    class Net(torch.nn.Module):
        _keep_in_fp32_modules: ClassVar[list[str]] = ["norm"]

        def __init__(self) -> None:
            super().__init__()
            self.proj, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)

    net = Net()
    _move(SimpleNamespace(components={"net": net, "tokenizer": object()}), torch.device("cpu"), torch.float16)
    assert net.proj.weight.dtype == torch.float16 and net.norm.weight.dtype == torch.float32


def test_single_file_loads_in_the_dtype_asked(tmp_path: Path) -> None:
    from lorakit.files.io import save_file
    from lorakit.models.loading import load_single_file
    from lorakit.tools.checkpoint import sd1_checkpoint

    from .test_single_file import _configs

    demo = load_model(None, device="cpu")
    save_file(sd1_checkpoint(demo.pipe), tmp_path / "tiny.safetensors")
    loaded = load_single_file(tmp_path / "tiny.safetensors", _configs(demo.pipe), dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(demo.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a if a[k].is_floating_point()), name


def test_release_freed_memory_empties_the_cuda_cache_and_trims_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the training data is encoded: CUDA's cached blocks go back; on the CPU glibc's free pages (or nothing,
    without glibc) — never an error."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    dev.release_freed_memory(torch.device("cuda"))
    assert calls == ["cuda"]
    dev.release_freed_memory(torch.device("cpu"))
    monkeypatch.setattr(dev.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    dev.release_freed_memory(torch.device("cpu"))
    assert calls == ["cuda"]
