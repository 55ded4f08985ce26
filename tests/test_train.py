"""``lorakit train``: data layout and errors, the training forward equal to inference, bitwise resume, the file
written (kohya keys, ss_* and modelspec metadata) and that a trained LoRA moves images toward its data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lorakit
from lorakit.errors import TrainDataError, TrainingError
from lorakit.files.io import load_file
from lorakit.models.loading import BaseModel, load_model
from lorakit.train import diffusion as dif
from lorakit.train.data import scan
from lorakit.train.loop import TrainConfig, Trainer
from lorakit.train.network import NETWORKS, NetworkSpec, factorize

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int, colour: tuple[int, int, int] = (20, 20, 30), caption: str | None = "a circle",
            ext: str = ".txt", size: tuple[int, int] = (64, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import ImageDraw

    for i in range(n):
        im = Image.new("RGB", size, colour)
        ImageDraw.Draw(im).ellipse((8 + 2 * i, 8, 52, 52), outline=(240, 240, 240), width=3)
        im.save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}{ext}").write_text(caption)


@pytest.fixture(scope="module")
def demo() -> BaseModel:
    """The shipped demo model; while its weights are being made, one of its architecture with random weights."""
    from lorakit.demo import weights

    if weights.WEIGHTS.is_file():
        return load_model(None, device="cpu", dtype="fp32")
    from diffusers import StableDiffusionPipeline

    from lorakit.generate.samplers import scheduler_for
    from lorakit.generate.tokenizer import clip_tokenizer
    from lorakit.keymap.arch import Arch

    torch.manual_seed(0)
    c = weights.build()
    for name in ("unet", "text_encoder"):
        c[name].lorakit_arch = Arch.DEMO
    pipe = StableDiffusionPipeline(vae=c["vae"].eval(), text_encoder=c["text_encoder"].eval(),
                                   tokenizer=clip_tokenizer(), unet=c["unet"].eval(),
                                   scheduler=scheduler_for("Euler a"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return BaseModel(pipe, "demo", "0" * 10, Arch.DEMO)


def _cfg(data: Path, out: Path, kind: str = "lora", **kw: object) -> TrainConfig:
    spec = NetworkSpec(kind, rank=4, alpha=2.0, train=str(kw.pop("train", "both")))
    kw.setdefault("steps", 4)
    kw.setdefault("lr", 5e-3)
    return TrainConfig(data, out, network=spec, **kw)  # type: ignore[arg-type]


# -- data -------------------------------------------------------------------------------------------------------
def test_captions_repeat_folders_trigger_and_both_extensions(tmp_path: Path) -> None:
    _images(tmp_path / "10_night sky", 2, caption=None)  # class words, no caption files
    _images(tmp_path / "plain", 1, caption="from caption", ext=".caption")
    _images(tmp_path, 1, caption="from txt")
    (tmp_path / "img0.caption").write_text("the other one")
    data = scan(tmp_path, trigger="nightstyle")
    by_name = {(it.folder, it.image.name): it for it in data.items}
    assert by_name[("10_night sky", "img0.png")].caption == "nightstyle, night sky"
    assert by_name[("10_night sky", "img0.png")].repeats == 10
    assert by_name[("plain", "img0.png")].caption == "nightstyle, from caption"
    assert by_name[("", "img0.png")].caption == "nightstyle, from txt"  # .txt wins, and the summary says so
    summary = data.summary()
    assert "1 with both .txt and .caption" in summary and "2 folder words" in summary and "1 from .caption" in summary
    assert data.dataset_dirs()["10_night sky"] == {"n_repeats": 10, "img_count": 2}
    assert data.tag_frequency()["10_night sky"] == {"nightstyle": 2, "night sky": 2}
    assert data.trained_triggers("nightstyle") == ["nightstyle", "night sky"]


def test_progress_without_a_terminal_is_a_line_every_tenth() -> None:
    import io

    from lorakit.train.progress import Lines, progress

    out = io.StringIO()
    now = [0.0]
    lines = Lines(200, 0, out, clock=lambda: now[0])
    for _ in range(200):
        now[0] += 1.0  # a step a second
        lines.update(0.5)
    text = out.getvalue().splitlines()
    assert len(text) == 10 and text[0].startswith("training: step 20/200 (10%), loss 0.5000, ")
    assert text[-1].startswith("training: step 200/200 (100%)") and text[-1].endswith("ETA 0s")
    assert text[0].endswith("1.00 it/s, ETA 3m00s")  # 180 steps left at 1 it/s
    assert isinstance(progress(10, 0, True, io.StringIO()), Lines) and progress(10, 0, False) is None


def test_triggers_are_only_words_that_were_trained(tmp_path: Path) -> None:
    """A folder word serves only images without a caption (kohya's rule): with a caption on every image it is no
    trigger, and the summary says so; a tag in every caption is one."""
    _images(tmp_path / "8_zqstyle", 3, caption="a red circle")
    data = scan(tmp_path)
    assert data.trained_triggers() == ["a red circle"] and "folder words not trained (zqstyle)" in data.summary()
    (tmp_path / "8_zqstyle" / "img1.txt").write_text("a blue square")
    assert scan(tmp_path).trained_triggers() == []
    assert scan(tmp_path, trigger="zq").trained_triggers() == ["zq"]
    for i in range(3):
        (tmp_path / "8_zqstyle" / f"img{i}.txt").write_text(f"Blueprint, shape {i}")
    assert scan(tmp_path).trained_triggers() == ["Blueprint"]


def test_bad_data_is_one_clear_error_each(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainDataError, match="no images"):
        scan(tmp_path / "empty")
    _images(tmp_path / "nocap", 2, caption=None)
    with pytest.raises(TrainDataError, match="2 images have no caption .* no --trigger was given: img0.png"):
        scan(tmp_path / "nocap")
    assert len(scan(tmp_path / "nocap", trigger="tok").items) == 2
    _images(tmp_path / "bad", 1)
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "bad" / "broken.txt").write_text("x")
    data = scan(tmp_path / "bad")
    assert len(data.items) == 1 and data.skipped[0][0].name == "broken.png" and "skipped 1 unreadable" in data.summary()
    with pytest.raises(TrainDataError, match="broken.png: unreadable image"):
        scan(tmp_path / "bad", bad_images="fail")
    with pytest.raises(TrainDataError, match="not a folder"):
        scan(tmp_path / "missing")


def test_bad_flags_are_training_errors(tmp_path: Path) -> None:
    for kw, match in ((dict(steps=0), "--steps"), (dict(lr=float("nan")), "--lr"), (dict(steps=2, epochs=2), "not both"),
                      (dict(sample_every=2), "--sample-prompt"), (dict(optimizer="sgd"), "--optimizer")):
        with pytest.raises(TrainingError, match=match):
            _cfg(tmp_path, tmp_path / "o.safetensors", **kw).check()
    with pytest.raises(TrainingError, match="--network"):
        NetworkSpec("lycoris").check()
    with pytest.raises(TrainingError, match=".safetensors"):
        _cfg(tmp_path, tmp_path / "o.ckpt").check()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(tmp_path / "empty"), "-o",
                        str(tmp_path / "x.safetensors"), "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("lorakit: error:"), r.stderr
    assert "Traceback" not in r.stderr


# -- math -------------------------------------------------------------------------------------------------------
def test_v_prediction_target_and_min_snr_weights() -> None:
    a = torch.tensor([0.9, 0.5, 0.1])
    eps, v = dif.NoiseSchedule(a, "epsilon"), dif.NoiseSchedule(a, "v_prediction")
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 2])
    sa, sb = a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(dif.add_noise(eps, x0, noise, t), sa * x0 + sb * noise)
    torch.testing.assert_close(dif.target(v, x0, noise, t), sa * noise - sb * x0)
    assert dif.target(eps, x0, noise, t) is noise
    snr = a / (1 - a)  # 9, 1, 0.111
    torch.testing.assert_close(dif.loss_weights(eps, t, 5.0), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(dif.loss_weights(v, t, 5.0), torch.clamp(snr, max=5) / (snr + 1))
    assert dif.loss_weights(eps, t, None) is None


def test_factorize_is_balanced() -> None:
    assert factorize(64) == (8, 8) and factorize(320) == (16, 20) and factorize(7) == (1, 7)


@pytest.mark.parametrize("kind", NETWORKS)
def test_training_forward_is_what_apply_loras_applies(kind: str, demo: BaseModel, tmp_path: Path) -> None:
    """A few steps, then the UNet and text encoder with the training hooks against ``apply_loras`` of the file."""
    _images(tmp_path / "data", 2)
    out = tmp_path / f"{kind}.safetensors"
    trainer = Trainer(_cfg(tmp_path / "data", out, kind, steps=3, save_dtype="fp32"), demo)
    trainer.run(progress=False)
    pipe = demo.pipe
    assert any(float(t.detach().abs().max()) > 0 for p, leaves in trainer.net.leaves.items()
               for k, t in leaves.items() if k in ("lora_up.weight", "hada_w2_a", "lokr_w2_b", "lokr_w2"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    ids = torch.randint(0, 49407, (1, 77), generator=gen)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0]
            return hidden, pipe.unet(x, torch.tensor([500]), encoder_hidden_states=hidden).sample

    bare = outputs()
    trainer.net.attach()
    try:
        trained = outputs()
    finally:
        trainer.net.detach()
    with lorakit.apply_loras(pipe, [(out, 1.0)]):
        applied = outputs()
    assert not torch.allclose(trained[1], bare[1])  # the network does something
    for got, want in zip(applied, trained):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(outputs(), bare))  # restored


def test_resume_ends_bitwise_where_an_uninterrupted_run_ends(demo: BaseModel, tmp_path: Path) -> None:
    _images(tmp_path / "data", 3)
    kw: dict[str, object] = dict(steps=6, save_every=2, schedule="cosine", warmup=2, batch=2, noise_offset=0.05,
                                 min_snr_gamma=5.0)
    whole = Trainer(_cfg(tmp_path / "data", tmp_path / "a" / "l.safetensors", "loha", **kw), demo)
    whole.run(progress=False)
    first = Trainer(_cfg(tmp_path / "data", tmp_path / "b" / "l.safetensors", "loha", **kw), demo)
    state = first.run(stop_at=3, progress=False)  # as if interrupted after step 3: the last checkpoint stays
    assert state.name == "l.state.pt" and (tmp_path / "b" / "l-000002.safetensors").is_file()
    resumed = Trainer(_cfg(tmp_path / "data", tmp_path / "b" / "l.safetensors", "loha", resume=state, **kw), demo)
    assert resumed.step == 3
    resumed.run(progress=False)
    a, _ = load_file(tmp_path / "a" / "l.safetensors")
    b, _ = load_file(tmp_path / "b" / "l.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses == resumed.losses
    other = _cfg(tmp_path / "data", tmp_path / "c" / "l.safetensors", "loha", resume=state, **{**kw, "steps": 7})
    with pytest.raises(TrainingError, match="other settings"):
        Trainer(other, demo)


def test_the_file_reads_back_with_base_type_rank_alpha_and_trigger(demo: BaseModel, tmp_path: Path) -> None:
    _images(tmp_path / "data" / "5_night", 2, caption=None)
    out = tmp_path / "night.safetensors"
    Trainer(_cfg(tmp_path / "data", out, "lokr", steps=2, trigger="nightstyle", preview=True), demo).run(progress=False)
    with Image.open(tmp_path / "night.preview.png") as preview:  # A1111's card preview, drawn with the LoRA
        assert preview.size == (64, 64) and "<lora:night:1>" in preview.text["parameters"]
        assert preview.text["parameters"].startswith("nightstyle, night")  # the first caption
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", "--json", str(out)], capture_output=True,
                       text=True, timeout=120)
    info = json.loads(r.stdout)
    assert info["architecture"] == "demo" and info["network_types"] == ["lokr"] and info["dialect"] == "kohya"
    assert "nightstyle" in info["trigger_words"] and info["hashes"]["sshs_matches"] is True
    _, meta = load_file(out)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_v2", "ss_resolution", "ss_steps", "ss_learning_rate", "ss_tag_frequency", "ss_dataset_dirs",
                "sshs_model_hash", "sshs_legacy_hash", "modelspec.architecture", "modelspec.title",
                "modelspec.trigger_phrase"):
        assert meta.get(key), key
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["ss_steps"] == "2"
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_night": {"n_repeats": 5, "img_count": 2}}
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr"
    sd, _ = load_file(out)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert any(k.endswith(".lokr_w1") for k in sd)


def test_sdxl_trains_and_writes_sdxl_names(tmp_path: Path) -> None:
    from lorakit.keymap.arch import Arch

    from .factories import tiny_sdxl_pipeline

    model = BaseModel(tiny_sdxl_pipeline(), "tiny-xl", "0" * 10, Arch.SDXL)
    _images(tmp_path / "data", 2)
    out = tmp_path / "xl.safetensors"
    trainer = Trainer(_cfg(tmp_path / "data", out, "locon", steps=2, resolution=64), model)
    trainer.run(progress=False)
    sd, meta = load_file(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te1_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)
    assert lorakit.load_lora(out).arch == Arch.SDXL


def test_a_trained_lora_moves_images_toward_its_data(demo: BaseModel, tmp_path: Path) -> None:
    """Blue training images: generated images get closer to the data's mean colour with the LoRA than without."""
    from lorakit.generate.pipeline import Generator, Request
    from lorakit.library import LoraIndex

    _images(tmp_path / "data" / "4_bluestyle", 4, colour=(30, 70, 220), caption="bluestyle, a circle")
    out = tmp_path / "loras" / "blue.safetensors"
    # caption dropout: the unconditional branch learns the look too, so that it holds under CFG
    Trainer(_cfg(tmp_path / "data", out, "locon", steps=100, lr=5e-3, batch=4, caption_dropout=0.25),
            demo).run(progress=False)
    target = np.array([30, 70, 220], dtype=np.float64)
    gen = Generator(demo, LoraIndex([tmp_path / "loras"]))
    try:
        def distance(prompt: str) -> float:
            imgs = [np.asarray(gen(Request(prompt, steps=8, width=64, height=64, seed=s)).images[0], np.float64)
                    for s in range(3)]
            return float(np.mean([np.abs(im.reshape(-1, 3).mean(0) - target).mean() for im in imgs]))
        without, with_lora = distance("bluestyle, a circle"), distance("bluestyle, a circle <lora:blue:1>")
    finally:
        gen.close()
    print(f"mean-colour distance to the data: {without:.1f} without the LoRA, {with_lora:.1f} with it")
    assert with_lora < 0.7 * without
