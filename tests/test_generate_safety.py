"""Generation never returns a silent wrong image: NaN/inf latents or pixels are a clear error (CLI exit 2, no PNG
written), an overflowing half-precision VAE decodes again in fp32, and bad settings are refused up front — each
with every weight restored bit-exactly. Also the per-step LoRA schedule and what the console says."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.cli import main
from lorakit.errors import IncompatibleLora, LorakitError, NonFiniteOutput
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import LoraIndex
from lorakit.models.loading import BaseModel, load_model

from .conftest import assert_original, snapshot
from .factories import make_kohya_lora

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


@pytest.fixture(scope="module")
def model() -> BaseModel:
    return load_model(None)


@pytest.fixture
def gen(model: BaseModel) -> Iterator[Generator]:
    g = Generator(model, LoraIndex([EXAMPLES]))
    yield g
    g.close()


def _req(prompt: str, negative: str = "", **kw: object) -> Request:
    base: dict[str, object] = dict(steps=3, width=64, height=64, seed=5)
    base.update(kw)
    return Request(prompt, negative, **base)  # type: ignore[arg-type]


def _times(out: object, factor: float) -> object:
    """A UNet output (a tuple, or an object with ``sample``) multiplied by ``factor``."""
    if isinstance(out, tuple):
        return (out[0] * factor, *out[1:])
    out.sample = out.sample * factor  # type: ignore[attr-defined]
    return out


def _parts(model: BaseModel) -> dict[str, torch.nn.Module]:
    return {"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder, "vae": model.pipe.vae}


@pytest.mark.parametrize("prompt,negative", [
    ("a cabin, painting", "ugly"),  # made NaN conditionings (mean restore over a zero mean) → black PNGs
    ("a cat <lora:demo_style:te=0.1@1,0.6@6>", ""),  # the SD.Next example, on the demo model
    ("a cat <lora:demo_style:0.6>", ""),
])
def test_ordinary_prompts_give_finite_images(gen: Generator, prompt: str, negative: str) -> None:
    image = np.asarray(gen(_req(prompt, negative, steps=8)).images[0])
    assert image.std() > 5  # not a flat (black) picture


def test_nan_latents_are_an_error_naming_the_step_and_weights_come_back(gen: Generator) -> None:
    snap = snapshot(_parts(gen.model))
    calls = {"n": 0}

    def poison(module: torch.nn.Module, args: object, out: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:  # the second UNet call: step 2
            return _times(out, float("nan"))
        return out

    handle = gen.model.pipe.unet.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteOutput, match=r"NaN/inf appeared in the latents at step 2 of 3"):
            gen(_req("a cat <lora:demo_style:0.5>"))
    finally:
        handle.remove()
    assert_original(_parts(gen.model), snap)


def test_nan_pixels_are_an_error(gen: Generator) -> None:
    handle = gen.model.pipe.vae.decoder.register_forward_hook(lambda m, a, out: out * float("inf"))
    try:
        with pytest.raises(NonFiniteOutput, match="decoded image"):
            gen(_req("a cat"))
    finally:
        handle.remove()


def test_half_vae_that_overflows_decodes_again_in_fp32(gen: Generator, caplog: pytest.LogCaptureFixture) -> None:
    vae = gen.model.pipe.vae
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    expected = np.asarray(gen(_req("a cat")).images[0]).astype(int)

    def overflow_in_half(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out * float("inf") if out.dtype == torch.float16 else out

    vae.to(torch.float16)
    vae.register_to_config(force_upcast=False)  # a VAE that does not ask to decode in fp32 up front
    handle = vae.decoder.register_forward_hook(overflow_in_half)
    try:
        with caplog.at_level(logging.WARNING, logger="lorakit"):
            image = np.asarray(gen(_req("a cat")).images[0]).astype(int)
    finally:
        handle.remove()
        vae.register_to_config(force_upcast=True)
        vae.to(torch.float32)
    assert "decoding again in fp32" in caplog.text
    assert vae.dtype == torch.float32
    # fp32 weights went through fp16 and back: the same fp16-rounded VAE, so the image is close, not identical
    assert np.abs(image - expected).mean() < 8
    for n, p in vae.named_parameters():
        assert torch.equal(p.detach(), before[n].half().float())


def test_cli_nan_exits_2_and_writes_no_png(tmp_path: Path, model: BaseModel, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("lorakit.models.loading.load_model", lambda *a, **k: model)
    handle = model.pipe.unet.register_forward_hook(lambda m, a, out: _times(out, float("nan")))
    out = tmp_path / "x.png"
    try:
        code = main(["generate", "a cat", "--lora-dir", str(EXAMPLES), "--steps", "2", "-W", "64", "-H", "64",
                     "-o", str(out)])
    finally:
        handle.remove()
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "NaN/inf appeared in the latents at step 1 of 2" in err and "Traceback" not in err


@pytest.mark.parametrize("skip", [0, -1, 3, 1000])
def test_clip_skip_outside_the_text_encoder_is_refused(gen: Generator, skip: int) -> None:
    snap = snapshot(_parts(gen.model))
    with pytest.raises(LorakitError, match=r"clip skip must be a whole number from 1 to 2"):
        gen(_req("a cat <lora:demo_style:1>", clip_skip=skip))
    assert_original(_parts(gen.model), snap)


def test_clip_skip_deepest_layer_works(gen: Generator) -> None:
    assert gen(_req("a cat", clip_skip=2)).settings["clip_skip"] == 2


def test_cli_clip_skip_too_deep_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "a cat", "--lora-dir", str(EXAMPLES), "--steps", "1", "-W", "64", "-H", "64",
                 "--clip-skip", "99", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "clip skip" in err


@pytest.mark.parametrize("seed", [2 ** 64, -2, 1.5])
def test_bad_seed_is_refused(gen: Generator, seed: object) -> None:
    with pytest.raises(LorakitError, match="seed must be"):
        gen(_req("a cat", seed=seed))


def test_largest_seed_reproduces(gen: Generator) -> None:
    top = 2 ** 64 - 1 - 16
    a, b = gen(_req("a cat", seed=top)), gen(_req("a cat", seed=top))
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_schedule_updates_strengths_without_rebuilding_the_plan(gen: Generator,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.patch as patch

    built = {"n": 0}
    real = patch.build_plan

    def counting(*args: object, **kwargs: object) -> object:
        built["n"] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(patch, "build_plan", counting)
    gen(_req("a cat <lora:demo_style:unet=0.1@1,1@6>", steps=6))
    assert built["n"] == 1  # resolved and checked once; steps 2..6 only moved strengths


def test_scheduled_hooks_equal_fused_at_constant_strength(gen: Generator) -> None:
    """A 'schedule' that stays at 0.7 runs through the hooks/update path and must equal fused 0.7."""
    fused = np.asarray(gen(_req("a cat <lora:demo_style:0.7>", steps=4)).images[0]).astype(int)
    hooked = np.asarray(gen(_req("a cat <lora:demo_style:te=0.7@0,0.7@1:unet=0.7@0,0.7@1>", steps=4)).images[0])
    assert np.abs(fused - hooked.astype(int)).max() <= 1


def test_console_shows_the_whole_schedule(gen: Generator, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lorakit"):
        gen(_req("a cat <lora:demo_style:te=0.1@1,0.6@6>", steps=6))
    assert "te 0.1@1 → 0.6@6" in caplog.text


def test_report_line_names_only_the_parts_a_lora_has_and_every_block() -> None:
    from lorakit.patch.weights import as_weight

    spec = as_weight({"lbw": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"})
    text = spec.describe(("unet",))
    assert text.startswith("unet 1") and "te " not in text
    assert text.count(" 0") == 16  # every block that is not 1, none cut off


def test_unet_only_lora_is_not_logged_with_a_te_weight(caplog: pytest.LogCaptureFixture) -> None:
    import lorakit

    from .factories import tiny_components

    c = tiny_components("sd1")
    sd = make_kohya_lora(c, lambda p: "lora" if p.startswith("unet.") else None)
    lora = lorakit.lora_from_state_dict(sd, {}, name="unet_only")
    with caplog.at_level(logging.INFO, logger="lorakit"):
        with lorakit.apply_loras(c, [(lora, 0.8)]):
            pass
    line = next(r.message for r in caplog.records if "unet_only" in r.message)
    assert "unet 0.8" in line and "te " not in line


def test_sd1_lora_on_the_demo_model_names_both_sides(gen: Generator, tmp_path: Path) -> None:
    from lorakit.files.io import save_file
    from lorakit.models.configs import build_components

    meta = build_components("sd1", device="meta")
    sd = make_kohya_lora(meta, lambda p: "lora" if p.endswith("attn2.to_k") else None, rank=2, convs=False)
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    save_file(sd, lora_dir / "sd15.safetensors")
    g = Generator(gen.model, LoraIndex([lora_dir]))
    snap = snapshot(_parts(gen.model))
    with pytest.raises(IncompatibleLora, match=r"Stable Diffusion 1\.x.*the embedded demo model"):
        g(_req("a cat <lora:sd15:1>"))
    assert_original(_parts(gen.model), snap)


def test_verbose_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(EXAMPLES / "demo_style.safetensors"), "-v"]) == 0
    assert main(["-v", "inspect", str(EXAMPLES / "demo_style.safetensors")]) == 0


def test_generate_auto_triggers_flag(tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(EXAMPLES / "demo_style.safetensors", folder / "demo_style.safetensors")
    (folder / "demo_style.json").write_text(json.dumps({"activation text": "inkwash, inkwash, moody light"}))
    out = tmp_path / "x.png"
    assert main(["generate", "a cat <lora:demo_style:0.5>", "--lora-dir", str(folder), "--steps", "1", "-W", "64",
                 "-H", "64", "--auto-triggers", "-o", str(out)]) == 0
    from PIL import Image

    text = Image.open(out).text["parameters"]
    first = text.splitlines()[0]
    assert first.count("inkwash") == 1 and "moody light" in first
