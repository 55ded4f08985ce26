"""Generation on FLUX.1 from a tiny FLUX pipeline saved as a diffusers folder, as a BFL transformer-only file and as
a ComfyUI all-in-one checkpoint: LoRA tags, fused = hooks, exact restore, distilled guidance and true CFG, mixed-LoRA
batches, img2img / inpainting, the CLI and the A1111 API."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.errors import LorakitError, ModelError
from lorakit.files.io import save_file
from lorakit.generate.init_image import InitImage
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.models.loading import load_model
from tests.flux_factories import bfl_lora, bfl_state, kohya_keys, tiny_flux_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dir: Path) -> Path:
    return tiny_flux_dir


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, flux_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    tr = load_model(str(flux_dir), device="cpu", dtype="fp32").pipe.transformer
    for name, kind, seed in (("style_a", "lora", 1), ("style_b", "lokr", 2)):
        layers = bfl_lora(tr, kind, seed=seed)
        big = {b: {k: (v * 20 if k == "lora_up.weight" or k == "lokr_w1" else v) for k, v in ls.items()}
               for b, ls in layers.items()}  # strong enough to show in a 64 px picture of a random model
        save_file(kohya_keys(big), folder / f"{name}.safetensors", {"ss_base_model_version": "flux1"})
    return folder


@pytest.fixture(scope="module")
def gen(flux_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Generator:
    model = load_model(str(flux_dir), device="cpu", dtype="fp32")
    index = tmp_path_factory.mktemp("index") / "i.sqlite3"
    return Generator(model, Library([lora_dir], index=index))


def _req(prompt: str, **kw: object) -> Request:
    base: dict[str, object] = dict(steps=2, width=SIZE, height=SIZE, seed=1)
    base.update(kw)
    return Request(prompt, **base)  # type: ignore[arg-type]


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_flux_folder_defaults_and_infotext(gen: Generator) -> None:
    assert (gen.model.arch, gen.model.variant) == ("flux1", "flux-1-dev")
    job = gen.resolve(Request("a cat"))
    assert (job.settings.steps, job.settings.cfg, job.settings.sampler, job.settings.guidance) == (28, 1.0, "Euler",
                                                                                                 3.5)
    assert (job.width, job.height) == (gen.model.native_size,) * 2
    result = gen(_req("a cat <lora:style_a:0.8>", guidance=5.0))
    text = result.infotexts[0]
    assert "Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 5, Seed: 1" in text and "Lora hashes" in text
    with pytest.raises(LorakitError, match="unknown sampler 'DPM\\+\\+ 2M' for FLUX.1"):
        gen(_req("a cat", sampler="DPM++ 2M"))
    with pytest.raises(LorakitError, match="multiple of 2"):
        gen(_req("a cat", width=65))


def test_lora_changes_the_image_fused_equals_hooks_and_restore_is_exact(gen: Generator) -> None:
    before = {n: p.detach().clone() for n, p in gen.model.pipe.transformer.named_parameters()}
    plain = _pixels(gen(_req("a cat")).images[0])
    fused = _pixels(gen(_req("a cat <lora:style_a:1>")).images[0])
    gen.lora_mode = "hooks"
    try:
        hooks = _pixels(gen(_req("a cat <lora:style_a:1>")).images[0])
    finally:
        gen.lora_mode = "fused"
    assert np.abs(fused - plain).max() > 8, "the LoRA must show"
    assert np.abs(fused - hooks).max() <= 2
    gen.close()
    assert all(torch.equal(p.detach(), before[n]) for n, p in gen.model.pipe.transformer.named_parameters())
    again = _pixels(gen(_req("a cat")).images[0])
    assert np.array_equal(again, plain)


def test_true_cfg_only_when_asked(gen: Generator) -> None:
    one = _pixels(gen(_req("a cat", negative="a dog")).images[0])
    same = _pixels(gen(_req("a cat", negative="something else")).images[0])
    assert np.array_equal(one, same), "cfg 1: the negative prompt is not read"
    cfg = _pixels(gen(_req("a cat", negative="a dog", cfg=4.0)).images[0])
    assert not np.array_equal(one, cfg)


def test_emphasis_is_read_as_plain_text(gen: Generator) -> None:
    a = _pixels(gen(_req("a (red:1.4) cat BREAK [small]")).images[0])
    b = _pixels(gen(_req("a red cat small")).images[0])
    assert np.array_equal(a, b)


def test_mixed_lora_batch_equals_each_request_alone_in_hooks_mode(gen: Generator) -> None:
    reqs = [_req("a cat <lora:style_a:1>"), _req("a dog <lora:style_b:0.7>", seed=2), _req("a bird", seed=3)]
    batched = gen.run_batch(reqs)
    gen.lora_mode = "hooks"
    try:
        alone = [gen(r) for r in reqs]
    finally:
        gen.lora_mode = "fused"
    for b, a in zip(batched, alone):
        assert not isinstance(b, LorakitError)
        assert np.abs(_pixels(b.images[0]) - _pixels(a.images[0])).max() <= 2


def test_img2img_and_inpainting(gen: Generator) -> None:
    from PIL import Image

    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    keep = gen(_req("a cat", init=InitImage(init, strength=0.0)))
    vae, processor = gen.model.pipe.vae, gen.model.pipe.image_processor
    with torch.no_grad():  # strength 0: the init image through the VAE only
        through = vae.decode(vae.encode(processor.preprocess(init)).latent_dist.mean).sample
    assert np.abs(_pixels(keep.images[0]) - _pixels(processor.postprocess(through, output_type="pil")[0])).max() <= 1
    changed = gen(_req("a cat <lora:style_a:1>", init=InitImage(init, strength=0.6)))
    assert changed.images[0].size == (SIZE, SIZE)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    painted = _pixels(gen(_req("a cat", init=InitImage(init, strength=1.0, mask=mask, mask_blur=(0, 0))))
                      .images[0])
    assert np.array_equal(painted[:, SIZE // 2 + 2:], np.asarray(init, dtype=np.int16)[:, SIZE // 2 + 2:])
    with pytest.raises(LorakitError, match="not available on FLUX.1"):
        gen(_req("a cat", init=InitImage(init, strength=1.0, mask=mask, fill=2)))


def test_bfl_transformer_only_file_with_components_gives_the_same_images(gen: Generator, flux_dir: Path,
                                                                          tmp_path: Path) -> None:
    gen.close()  # the base weights, no LoRA fused in
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_state(gen.model.pipe.transformer), path)
    with pytest.raises(ModelError, match="--components"):
        load_model(str(path), device="cpu", dtype="fp32")
    model = load_model(str(path), device="cpu", dtype="fp32", components=str(flux_dir))
    assert model.arch == "flux1"
    for (name, a), (_, b) in zip(sorted(model.pipe.transformer.state_dict().items()),
                                 sorted(gen.model.pipe.transformer.state_dict().items())):
        assert torch.equal(a, b), name
    other = Generator(model, gen.index)
    req = _req("a cat <lora:style_b:1>")
    assert np.array_equal(_pixels(other(req).images[0]), _pixels(gen(req).images[0]))


def test_comfyui_all_in_one_file(gen: Generator, flux_dir: Path, tmp_path: Path) -> None:
    from lorakit.tools.checkpoint import vae_to_ldm

    gen.close()  # the base weights, no LoRA fused in
    pipe = gen.model.pipe
    sd = {f"model.diffusion_model.{k}": v for k, v in bfl_state(pipe.transformer).items()}
    sd.update({f"text_encoders.clip_l.transformer.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()})
    sd.update({f"text_encoders.t5xxl.transformer.{k}": v.clone() for k, v in pipe.text_encoder_2.state_dict().items()})
    sd.update({"first_stage_model." + vae_to_ldm(k, pipe.vae.config): v.clone() for k, v in pipe.vae.state_dict().items()})
    path = tmp_path / "flux-aio.safetensors"
    save_file(sd, path)
    model = load_model(str(path), device="cpu", dtype="fp32", components=str(flux_dir))
    other = Generator(model, gen.index)
    req = _req("a cat <lora:style_a:1>")
    assert np.array_equal(_pixels(other(req).images[0]), _pixels(gen(req).images[0]))


def test_schnell_has_no_guidance(flux_dir: Path, tmp_path: Path, gen: Generator) -> None:
    path = tmp_path / "schnell"
    tiny_flux_pipeline(guidance=False).save_pretrained(path)  # type: ignore[attr-defined]
    model = load_model(str(path), device="cpu", dtype="fp32")
    schnell = Generator(model, gen.index)
    assert model.variant == "flux-1-schnell"
    job = schnell.resolve(_req("a cat", guidance=2.0))
    assert (job.settings.steps, job.settings.guidance) == (2, None) and "ignored" in " ".join(job.notes)
    assert schnell.resolve(Request("a cat")).settings.steps == 4
    assert "Distilled CFG Scale" not in schnell(_req("a cat")).infotexts[0]


def test_cli_generate_on_flux(flux_dir: Path, lora_dir: Path, tmp_path: Path) -> None:
    from lorakit.cli import main

    out = tmp_path / "flux.png"
    rc = main(["generate", "a cat <lora:style_a:0.9>", "--model", str(flux_dir), "--lora-dir", str(lora_dir),
               "--steps", "2", "-W", str(SIZE), "-H", str(SIZE), "--seed", "3", "--guidance", "4", "-o", str(out),
               "--device", "cpu"])
    assert rc == 0
    from PIL import Image

    text = Image.open(out).text["parameters"]  # type: ignore[attr-defined]
    assert "Distilled CFG Scale: 4" in text and "style_a" in text


def test_a1111_api_takes_forges_distilled_cfg_scale(gen: Generator, flux_dir: Path, lora_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from lorakit.server.app import create_app

    app = create_app(gen.model, gen.index)
    with TestClient(app) as client:
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:style_a:1>", "steps": 2,
                                                       "width": SIZE, "height": SIZE, "seed": 5,
                                                       "distilled_cfg_scale": 2.5})
        assert reply.status_code == 200, reply.text
        info = json.loads(reply.json()["info"])
        assert info["extra_generation_params"] == {"Distilled CFG Scale": 2.5}
        png = reply.json()["images"][0]
        parsed = client.post("/sdapi/v1/png-info", json={"image": png}).json()
        assert parsed["parameters"]["Distilled CFG Scale"] == "2.5"
        assert "Distilled CFG Scale: 2.5" in parsed["info"]
        bad = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "sampler_name": "DDIM", "steps": 2})
        assert bad.status_code == 422 and "for FLUX.1" in bad.text


def test_loras_of_another_family_are_refused_by_name(gen: Generator, tmp_path: Path) -> None:
    from tests.factories import make_kohya_lora, tiny_components

    folder = tmp_path / "sd"
    folder.mkdir()
    save_file(make_kohya_lora(tiny_components("sdxl")), folder / "xl.safetensors")
    other = Generator(gen.model, Library([folder], index=tmp_path / "i.sqlite3"))
    with pytest.raises(LorakitError, match="Stable Diffusion XL.*FLUX.1"):
        other(_req("a cat <lora:xl:1>"))


def _decode_png(data: str) -> object:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_step_schedule_grid_and_batch_on_flux(gen: Generator, tmp_path: Path) -> None:
    """A denoiser schedule (hooks, strengths moved per step), a grid over distilled guidance, and a JSONL batch with
    Forge's field, on FLUX.1."""
    from lorakit.batch.axes import parse_axis
    from lorakit.batch.grid import run_grid

    scheduled = gen(_req("a cat <lora:style_a:unet=0@0,1@0.5>", steps=4))
    assert scheduled.images[0].size == (SIZE, SIZE)
    run = run_grid(gen, _req("a cat <lora:style_a:1>"), parse_axis("guidance=1,5"), parse_axis("lora:style_a=0,1"),
                   None, tmp_path / "grid.png")
    assert len(run.paths) == 1 and run.paths[0].is_file()
    from lorakit.batch.jobs import read_jobs

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat <lora:style_b:1>", "steps": 2, "width": SIZE, "height": SIZE,
                                "seed": 3, "distilled_cfg_scale": 2.0}) + "\n")
    (item,) = read_jobs(jobs)
    (req,) = item.requests
    assert req.guidance == 2.0
    assert "Distilled CFG Scale: 2" in gen(req).infotexts[0]
