"""Base models from diffusers folders, offline: a tiny SD1 and a tiny SDXL pipeline saved and loaded back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import LoraIndex
from lorakit.models.loading import ModelError, load_model

from .factories import make_kohya_lora, tiny_sd2_pipeline, tiny_sdxl_pipeline


def _generate_with_lora(folder: Path, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    model = load_model(str(folder))
    comps = {k: getattr(model.pipe, k) for k in ("unet", "text_encoder", "text_encoder_2") if
             getattr(model.pipe, k, None) is not None}
    save_file(make_kohya_lora(comps, "lora", rank=2, seed=3), tmp / "tiny_style.safetensors")
    gen = Generator(model, LoraIndex([tmp]))
    try:
        req = dict(steps=2, width=64, height=64, seed=1)
        plain = np.asarray(gen(Request("a cat", **req)).images[0])  # type: ignore[arg-type]
        styled = np.asarray(gen(Request("a cat <lora:tiny_style:1>", **req)).images[0])  # type: ignore[arg-type]
    finally:
        gen.close()
    return plain, styled


def test_sd1_folder_loads_offline_and_generates(tmp_path: Path) -> None:
    load_model(None).pipe.save_pretrained(tmp_path / "sd1")
    model = load_model(str(tmp_path / "sd1"))
    assert model.name == "sd1" and not model.sdxl and len(model.hash) == 10
    plain, styled = _generate_with_lora(tmp_path / "sd1", tmp_path)
    assert plain.shape == (64, 64, 3) and not np.array_equal(plain, styled)


def test_sd2_folder_openclip_tokenizer_and_lora(tmp_path: Path) -> None:
    tiny_sd2_pipeline().save_pretrained(tmp_path / "sd2")  # type: ignore[attr-defined]
    model = load_model(str(tmp_path / "sd2"))
    assert model.pipe.tokenizer.pad_token == "!" and model.pipe.scheduler.config.prediction_type == "v_prediction"
    plain, styled = _generate_with_lora(tmp_path / "sd2", tmp_path)
    assert not np.array_equal(plain, styled)


def test_sdxl_folder_two_encoders_pooled_and_lora(tmp_path: Path) -> None:
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "xl")  # type: ignore[attr-defined]
    model = load_model(str(tmp_path / "xl"))
    assert model.sdxl and model.arch == "sdxl"
    plain, styled = _generate_with_lora(tmp_path / "xl", tmp_path)
    assert not np.array_equal(plain, styled)


@pytest.mark.parametrize("make,msg", [
    (lambda p: p, "no such model"),
    (lambda p: (p.mkdir(), p)[1], "not a diffusers model folder"),
    (lambda p: (p.write_bytes(b"x"), p)[1], "too short to be a safetensors file"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text("{bad"), p)[2], "unreadable"),
])
def test_bad_model_paths(tmp_path: Path, make: object, msg: str) -> None:
    path = make(tmp_path / "m")  # type: ignore[operator]
    with pytest.raises(lorakit.LorakitError, match=msg):
        load_model(str(path))
    assert isinstance(ModelError("x"), lorakit.LorakitError)


def test_v_prediction_from_the_model_folder_is_kept(tmp_path: Path) -> None:
    """An SD2-768-style folder whose scheduler predicts v keeps doing so whatever sampler is chosen."""
    model = load_model(None)
    model.pipe.scheduler = model.pipe.scheduler.__class__.from_config(model.pipe.scheduler.config,
                                                                      prediction_type="v_prediction")
    model.pipe.save_pretrained(tmp_path / "v")
    gen = Generator(load_model(str(tmp_path / "v")), LoraIndex([]))
    gen(Request("a cat", steps=1, width=64, height=64, seed=1, sampler="DPM++ 2M"))
    assert gen.family.prediction_type == "v_prediction"  # type: ignore[attr-defined]
    assert gen.model.pipe.scheduler.config.prediction_type == "v_prediction"


def test_sd1_lora_on_sdxl_model_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    from lorakit.cli import main

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "xl")  # type: ignore[attr-defined]
    examples = Path(__file__).resolve().parents[1] / "examples" / "loras"
    out = tmp_path / "x.png"
    model = load_model(str(tmp_path / "xl"))
    gen = Generator(model, LoraIndex([examples]))
    before = {n: p.detach().clone() for n, p in model.pipe.unet.named_parameters()}
    with pytest.raises(lorakit.IncompatibleLora, match="for Stable Diffusion 1.x, the model is Stable Diffusion XL"):
        gen(Request("a cat <lora:ink_sketch_sd15:1>", steps=1, width=64, height=64, seed=1))
    assert all(torch.equal(p, before[n]) for n, p in model.pipe.unet.named_parameters())
    assert main(["generate", "a cat <lora:ink_sketch_sd15>", "-m", str(tmp_path / "xl"), "-l", str(examples),
                 "--steps", "1", "-W", "64", "-H", "64", "-o", str(out)]) == 2
    assert not out.exists()
