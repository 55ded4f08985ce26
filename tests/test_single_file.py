"""A1111-style single-file checkpoints: written from a tiny SD1 pipeline, loaded back offline, exactly."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import LoraIndex
from lorakit.models.loading import BaseModel, load_model, load_single_file
from lorakit.models.single_file import CheckpointError
from lorakit.errors import ModelError
from lorakit.tools.checkpoint import sd1_checkpoint

from .factories import tiny_sd2_pipeline, tiny_sdxl_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


@pytest.fixture(scope="module")
def demo() -> BaseModel:
    return load_model(None)


def _configs(pipe: object) -> dict[str, dict[str, object]]:
    return {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config),  # type: ignore[attr-defined]
            "text_encoder": pipe.text_encoder.config.to_dict()}  # type: ignore[attr-defined]


def _image(model: BaseModel) -> np.ndarray:
    gen = Generator(model, LoraIndex([EXAMPLES]))
    try:
        req = Request("a cat <lora:demo_style:0.7>", steps=2, width=64, height=64, seed=9)
        return np.asarray(gen(req).images[0])
    finally:
        gen.close()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tiny_sd1_checkpoint_roundtrip_offline(demo: BaseModel, tmp_path: Path, suffix: str) -> None:
    sd = sd1_checkpoint(demo.pipe)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, str(path))
    else:
        save_file(sd, path)
    loaded = load_single_file(path, _configs(demo.pipe))
    for comp in ("unet", "vae", "text_encoder"):
        a, b = getattr(demo.pipe, comp).state_dict(), getattr(loaded.pipe, comp).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), comp
    assert loaded.name == "tiny" and len(loaded.hash) == 10
    assert np.array_equal(_image(loaded), _image(demo))


def test_full_size_sd15_keys_and_shapes_map_exactly() -> None:
    """The full-size SD1.5 layout (on the meta device): every tensor of a checkpoint lands in the model."""
    from diffusers import AutoencoderKL

    from lorakit.models.configs import CLIP_L, SD1_UNET, SD_VAE, build_components
    from lorakit.models.single_file import build_pipeline

    comps = build_components("sd1")
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    sd = sd1_checkpoint(SimpleNamespace(unet=comps["unet"], vae=vae, text_encoder=comps["text_encoder"]))
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == len(comps["unet"].state_dict())
    pipe = build_pipeline(sd, Path("meta.safetensors"), "sd1", {"unet": SD1_UNET, "vae": SD_VAE,
                                                                 "text_encoder": CLIP_L})
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964


def test_lora_passed_as_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="this is a LoRA, not a base model"):
        load_model(str(EXAMPLES / "demo_style.safetensors"))


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_tiny_sd2_and_sdxl_checkpoint_roundtrip(tmp_path: Path, arch: str) -> None:
    """OpenCLIP-named text encoders (fused q/k/v) and SDXL's two encoders + label embedding, exactly."""
    from lorakit.tools.checkpoint import to_checkpoint

    pipe = tiny_sd2_pipeline() if arch == "sd2" else tiny_sdxl_pipeline()
    save_file(to_checkpoint(pipe, arch), tmp_path / f"{arch}.safetensors")
    configs = _configs(pipe)
    if arch == "sdxl":
        configs["text_encoder_2"] = pipe.text_encoder_2.config.to_dict()  # type: ignore[attr-defined]
    loaded = load_single_file(tmp_path / f"{arch}.safetensors", configs)
    assert loaded.arch == arch and loaded.sdxl == (arch == "sdxl")
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if arch == "sdxl" else ())
    for comp in names:
        a, b = getattr(pipe, comp).state_dict(), getattr(loaded.pipe, comp).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), comp
    if arch == "sd2":
        assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"
    original = BaseModel(pipe, "orig", "0" * 10, arch)
    gen_a, gen_b = Generator(original, LoraIndex([])), Generator(loaded, LoraIndex([]))
    req = Request("a cat, (masterpiece:1.2)", "blurry", steps=2, width=64, height=64, seed=3)
    assert np.array_equal(np.asarray(gen_a(req).images[0]), np.asarray(gen_b(req).images[0]))


@pytest.mark.parametrize("keys,msg", [({"foo.bar": torch.zeros(1)}, "not a Stable Diffusion checkpoint"),
                                      ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "--components DIR"),
                                      ({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)},
                                       "an SD3 single file.*--components DIR")])
def test_not_sd_files(tmp_path: Path, keys: dict[str, torch.Tensor], msg: str) -> None:
    """Not an SD checkpoint: what it is, named; a FLUX.1 or SD3 file asks for the folder its tokenizers come from."""
    path = tmp_path / "x.safetensors"
    save_file(keys, path)
    with pytest.raises(ModelError, match=msg):
        load_model(str(path))


def test_tiny_checkpoint_with_full_size_configs_fails_clearly(demo: BaseModel, tmp_path: Path) -> None:
    save_file(sd1_checkpoint(demo.pipe), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="tiny.safetensors: the UNet"):
        load_model(str(tmp_path / "tiny.safetensors"))


def test_cli_lora_as_model_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "a cat", "-m", str(EXAMPLES / "demo_style.safetensors"), "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "this is a LoRA" in capsys.readouterr().err
    assert isinstance(CheckpointError("x"), lorakit.LorakitError)
