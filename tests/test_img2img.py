"""img2img and inpainting (``generate/init_image.py``, ``generate/img2img.py``): A1111's resize modes, mask blur,
masked content and "only masked"; the original kept outside the mask; LoRAs applied; seeds as in txt2img; SDXL;
bad images refused with lorakit's error."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.errors import ImageInputError
from lorakit.files.io import save_file
from lorakit.generate.img2img import derived_pipe
from lorakit.generate.init_image import (
    InitImage,
    crop_region,
    fill_masked,
    open_image,
    resize_image,
    steps_run,
)
from lorakit.generate.pipeline import Generator, Request
from lorakit.keymap.arch import Arch
from lorakit.library import Library
from lorakit.models.loading import BaseModel, demo_model

from .conftest import assert_original, snapshot
from .factories import make_kohya_lora, tiny_sdxl_pipeline
from .servers import EXAMPLES

SIZE: dict[str, Any] = {"width": 64, "height": 64, "steps": 8, "cfg": 5.0, "sampler": "Euler a"}
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("i2i")
    model = demo_model()
    model.pipe.set_progress_bar_config(disable=True)
    g = Generator(model, Library([EXAMPLES], index=folder / "index.sqlite3"))
    base = g(Request(PROMPT, seed=3, **SIZE)).images[0]
    yield g, base
    g.close()


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _right_half_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    return mask


def test_steps_run_as_diffusers_counts() -> None:
    assert [steps_run(20, s) for s in (0.0, 0.01, 0.05, 0.5, 0.75, 1.0)] == [0, 0, 1, 10, 15, 20]


def test_img2img_is_seeded_per_image_and_keeps_more_with_lower_strength(gen: Any) -> None:
    g, base = gen
    run = lambda strength, **kw: g(Request("a blue square", seed=5, init=InitImage(base, strength), **{**SIZE, **kw}))
    a, b = run(0.5), run(0.5)
    assert np.array_equal(_px(a.images[0]), _px(b.images[0])), "same seed, same image"
    pair = run(0.5, batch=2)
    # Image 0 of a batch has the seed's noise, but the CPU's kernels block a batch of 2 differently from 1 (with
    # more than one thread): a few pixels may round to the next level, as in txt2img.
    assert np.abs(_px(pair.images[0]) - _px(a.images[0])).max() <= 2, "image 0 of a batch = the image alone"
    assert pair.seeds == [5, 6] and not np.array_equal(_px(pair.images[0]), _px(pair.images[1]))
    far = [np.abs(_px(run(s).images[0]) - _px(base)).mean() for s in (0.25, 1.0)]
    assert far[0] < far[1], f"strength 0.25 must stay nearer the init image than 1.0: {far}"
    assert "Denoising strength: 0.5" in a.infotexts[0]


def test_strength_zero_is_the_vae_round_trip(gen: Any) -> None:
    g, base = gen
    out = g(Request("anything", seed=1, init=InitImage(base, 0.0), **SIZE)).images[0]
    assert np.abs(_px(out) - _px(base)).mean() < 40  # the demo's 4×-down VAE is lossy, but it is the image
    again = g(Request("something else", seed=9, init=InitImage(base, 0.0), **SIZE)).images[0]
    assert np.array_equal(_px(out), _px(again)), "no sampling: prompt and seed do not matter"


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpainting_keeps_the_outside_of_the_mask_exactly(gen: Any, fill: int) -> None:
    g, base = gen
    init = InitImage(base, 0.9, mask=_right_half_mask(), mask_blur=(2, 2), fill=fill)
    out = _px(g(Request("a green star", seed=4, init=init, **SIZE)).images[0])
    outside = slice(0, 32 - 2 * 3)  # left of the mask, beyond its blur
    assert np.array_equal(out[:, outside], _px(base)[:, outside]), "unmasked pixels must be the original's"
    assert np.abs(out[:, 40:] - _px(base)[:, 40:]).mean() > 3, "the masked half must be repainted"


def test_latent_fills_replace_what_was_under_the_mask(gen: Any) -> None:
    """Latent noise and latent nothing change what the masked area starts from (and only there): at the same seed
    and strength they give another masked area than "original", the same outside."""
    g, base = gen
    out = {}
    for fill in (1, 2, 3):
        init = InitImage(base, 0.5, mask=_right_half_mask(), mask_blur=(0, 0), fill=fill)
        out[fill] = _px(g(Request(PROMPT, seed=4, init=init, **SIZE)).images[0])
    for fill in (2, 3):
        assert np.abs(out[fill][:, 36:] - out[1][:, 36:]).mean() > 5, f"fill {fill} must change the masked area"
        assert np.array_equal(out[fill][:, :28], out[1][:, :28])
    assert np.abs(out[2][:, 36:] - out[3][:, 36:]).mean() > 1, "noise and nothing are different starts"


def test_inverted_mask_repaints_the_other_side(gen: Any) -> None:
    g, base = gen
    init = InitImage(base, 0.9, mask=_right_half_mask(), mask_blur=(0, 0), invert_mask=True)
    out = _px(g(Request("a green star", seed=4, init=init, **SIZE)).images[0])
    assert np.array_equal(out[:, 32:], _px(base)[:, 32:])


def test_only_masked_repaints_the_region_and_pastes_it_back(gen: Any) -> None:
    g, base = gen
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 40, 56, 56))
    init = InitImage(base, 0.9, mask=mask, mask_blur=(0, 0), only_masked=True, padding=4)
    result = g(Request("a green star", seed=4, init=init, **SIZE))
    out = _px(result.images[0])
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[:36], _px(base)[:36]) and np.array_equal(out[:, :36], _px(base)[:, :36])
    assert np.abs(out[40:56, 40:56] - _px(base)[40:56, 40:56]).mean() > 3
    assert "Inpaint area: Only masked" in result.infotexts[0]
    assert crop_region(mask, 64, 64, 4) == (36, 36, 60, 60)
    assert crop_region(Image.new("L", (64, 64), 0), 64, 64, 4) is None


def test_loras_apply_in_img2img_and_weights_come_back(gen: Any) -> None:
    g, base = gen
    comps = {"unet": g.model.pipe.unet, "text_encoder": g.model.pipe.text_encoder}
    g.close()
    pristine = snapshot(comps)
    plain = g(Request("a star", seed=2, init=InitImage(base, 0.8), **SIZE)).images[0]
    styled = g(Request("a star <lora:blueprint_style:1>", seed=2, init=InitImage(base, 0.8), **SIZE)).images[0]
    assert np.abs(_px(plain) - _px(styled)).mean() > 3
    g.close()
    assert_original(comps, pristine)


def test_resize_modes() -> None:
    wide = Image.new("RGB", (128, 64), (0, 0, 255))
    wide.paste((255, 0, 0), (48, 0, 80, 64))  # a red band in the middle
    stretched = np.asarray(resize_image(wide, 64, 64, 0))
    cropped = np.asarray(resize_image(wide, 64, 64, 1))
    filled = np.asarray(resize_image(wide, 64, 64, 2))
    assert stretched.shape == cropped.shape == filled.shape == (64, 64, 3)
    assert (cropped[:, 16:48, 0] > 200).all(), "crop and resize: the centre fills the frame"
    assert (stretched[:, 28:36, 0] > 200).all() and (stretched[:, :20, 2] > 200).all()
    assert filled[16:48, 28:36, 0].min() > 200 and filled[16:48, :20, 2].min() > 200, "resize and fill: it fits"
    assert filled[:16, 28:36, 0].min() > 200 and filled[-16:, :20, 2].min() > 200, \
        "the bands above and below take the colours of the image's first and last rows"


def test_fill_paints_the_mask_with_the_colours_around_it() -> None:
    image = Image.new("RGB", (64, 64), (20, 40, 200))
    image.paste((255, 0, 0), (16, 16, 48, 48))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (12, 12, 52, 52))
    out = np.asarray(fill_masked(image, mask), dtype=np.int16)
    assert np.abs(out - np.array([20, 40, 200])).max() <= 1, "nothing of the red square may remain"


def test_bad_images_are_lorakit_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="init: not a readable image"):
        open_image(b"GIF89a garbage", "init")
    with pytest.raises(ImageInputError, match="megapixels"):
        open_image(_png_header(100_000, 100_000), "mask")  # refused from the header, nothing decoded
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert open_image(buf.getvalue(), "x").size == (8, 8)
    for bad in (InitImage(Image.new("RGB", (8, 8)), 1.5), InitImage(Image.new("RGB", (8, 8)), resize_mode=7),
                InitImage(Image.new("RGB", (8, 8)), fill=4), InitImage(Image.new("RGB", (8, 8)), strength=float("nan"))):
        with pytest.raises(ImageInputError):
            bad.check()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_derived_pipelines_share_modules_and_keep_the_dtype() -> None:
    model = demo_model()
    model.pipe.unet.to(torch.float16)
    for inpaint in (False, True):
        pipe = derived_pipe(model, inpaint)
        assert pipe.unet is model.pipe.unet and pipe.vae is model.pipe.vae
        assert model.pipe.unet.dtype == torch.float16, "making the img2img pipeline must not cast the model"


def test_sdxl_img2img_and_inpainting(tmp_path: Path) -> None:
    pipe: Any = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    model = BaseModel(pipe, "tiny-xl", "0123456789", Arch.SDXL)
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    save_file(make_kohya_lora(comps, "lora", rank=4, seed=1), tmp_path / "xl.safetensors", {})
    g = Generator(model, Library([tmp_path], index=tmp_path / "index.sqlite3"))
    base = Image.new("RGB", (64, 64), (200, 30, 30))
    small = {**SIZE, "steps": 4}
    out = g(Request("a cat <lora:xl:1>", seed=1, init=InitImage(base, 0.6), **small)).images[0]
    assert out.size == (64, 64)
    init = InitImage(base, 0.9, mask=_right_half_mask(), mask_blur=(0, 0), fill=2)
    painted = _px(g(Request("a cat <lora:xl:1>", seed=1, init=init, **small)).images[0])
    assert np.array_equal(painted[:, :32], _px(base)[:, :32])
    g.close()


def test_cli_generate_img2img_and_inpainting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (80, 64), (30, 60, 200)).save(init)
    _right_half_mask().save(mask)
    common = ["--seed", "2", "--steps", "4", "--lora-dir", str(EXAMPLES)]
    assert main(["generate", "a star <lora:blueprint_style:1>", "--init-image", str(init), "--strength", "0.5",
                 "--resize-mode", "1", "-o", str(tmp_path / "a.png"), *common]) == 0
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "a.png").info["parameters"]
    assert main(["generate", "a star", "--init-image", str(init), "--mask", str(mask), "--masked-content", "3",
                 "--only-masked", "8", "-o", str(tmp_path / "b.png"), *common]) == 0
    out = _px(Image.open(tmp_path / "b.png"))
    assert np.array_equal(out[:, :20], _px(Image.new("RGB", (64, 64), (30, 60, 200)))[:, :20])
    capsys.readouterr()
    assert main(["generate", "x", "--init-image", str(tmp_path / "missing.png"), *common]) == 2
    assert main(["generate", "x", "--mask", str(mask), *common]) == 2
    assert main(["generate", "x", "--init-image", str(init), "--strength", "1.5", *common]) == 2
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err and "--mask needs --init-image" in err
    assert "denoising strength must be from 0 to 1, got 1.5" in err
