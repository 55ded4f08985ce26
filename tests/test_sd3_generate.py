"""SD3 / SD3.5 models and generation, from a tiny StableDiffusion3Pipeline (diffusers' test config) saved as a
diffusers folder, as a SAI transformer-only file and as a SAI all-in-one file: loading offline, the size, real CFG
with negative prompts, the scheduler's shift, LoRA tags with text-encoder weights (CLIP-L, CLIP-G, T5), fused =
hooks, exact restore, LoRAs of another size or family refused with the reason, the CLI and the A1111 API."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.errors import LorakitError, ModelError
from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.models.loading import load_model
from tests.sd3_factories import kohya_keys, sai_lora, sai_state, tiny_sd3_pipeline

SIZE = 64
META = {"modelspec.architecture": "stable-diffusion-3-medium/lora"}


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tinysd3") / "tinysd3"
    tiny_sd3_pipeline().save_pretrained(path)  # type: ignore[attr-defined]
    return path


def _te_keys(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """kohya text-encoder layers for CLIP-L (``lora_te1_``), CLIP-G (``lora_te2_``) and T5 (``lora_te3_``)."""
    out: dict[str, torch.Tensor] = {}
    for name in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_mlp_fc1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"):
        wide = 37 if name.endswith("fc1") else 32
        out[f"{name}.lora_down.weight"] = torch.randn(4, 32, generator=gen)
        out[f"{name}.lora_up.weight"] = torch.randn(wide, 4, generator=gen) * 4
        out[f"{name}.alpha"] = torch.tensor(4.0)
    return out


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, sd3_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("sd3loras")
    tr = load_model(str(sd3_dir), device="cpu", dtype="fp32").pipe.transformer
    for name, kind, seed in (("style_a", "lora", 1), ("style_b", "lokr", 2)):
        layers = sai_lora(tr, kind, seed=seed)
        big = {s: {k: (v * 20 if k in ("lora_up.weight", "lokr_w1") else v) for k, v in ls.items()}
               for s, ls in layers.items()}  # strong enough to show in a 64 px picture of a random model
        keys = kohya_keys(big)
        if name == "style_a":
            keys.update(_te_keys(torch.Generator().manual_seed(7)))
        save_file(keys, folder / f"{name}.safetensors", META)
    save_file(kohya_keys(sai_lora(tr, "lora", seed=3)), folder / "large.safetensors",
              {"modelspec.architecture": "stable-diffusion-3-5-large/lora"})
    return folder


@pytest.fixture(scope="module")
def gen(sd3_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Generator:
    model = load_model(str(sd3_dir), device="cpu", dtype="fp32")
    return Generator(model, Library([lora_dir], index=tmp_path_factory.mktemp("index") / "i.sqlite3"))


def _req(prompt: str, **kw: object) -> Request:
    base: dict[str, object] = dict(steps=2, width=SIZE, height=SIZE, seed=1, cfg=1.0)
    base.update(kw)
    return Request(prompt, **base)  # type: ignore[arg-type]


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_folder_size_defaults_shift_and_infotext(gen: Generator) -> None:
    assert (gen.model.arch, gen.model.variant) == ("sd3-medium", "sd3-medium")
    job = gen.resolve(Request("a cat", guidance=3.0))
    assert (job.settings.steps, job.settings.cfg, job.settings.sampler, job.settings.guidance) == (28, 7.0, "Euler",
                                                                                                 None)
    assert "ignored" in " ".join(job.notes)
    assert gen.family.scheduler.config.shift == 3.0  # type: ignore[attr-defined]
    assert not gen.family.scheduler.config.use_dynamic_shifting  # type: ignore[attr-defined]
    text = gen(_req("a cat <lora:style_a:0.8>", cfg=5.0)).infotexts[0]
    assert "Sampler: Euler, CFG scale: 5, Seed: 1" in text and "style_a" in text
    with pytest.raises(LorakitError, match="unknown sampler 'DPM\\+\\+ 2M' for Stable Diffusion 3"):
        gen(_req("a cat", sampler="DPM++ 2M"))
    with pytest.raises(LorakitError, match="multiple of 4"):
        gen(_req("a cat", width=66))


def test_real_cfg_reads_the_negative_prompt(gen: Generator) -> None:
    one = _pixels(gen(_req("a cat", negative="a dog")).images[0])
    same = _pixels(gen(_req("a cat", negative="something else")).images[0])
    assert np.array_equal(one, same), "cfg 1: no guidance, the negative prompt is not read"
    a = _pixels(gen(_req("a cat", negative="a dog", cfg=6.0)).images[0])
    b = _pixels(gen(_req("a cat", negative="something else", cfg=6.0)).images[0])
    assert not np.array_equal(a, b) and not np.array_equal(a, one)


def test_lora_and_its_text_encoder_parts_fused_equals_hooks_restore_exact(gen: Generator) -> None:
    pipe = gen.model.pipe
    modules = {n: getattr(pipe, n) for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
    before = {f"{c}.{n}": p.detach().clone() for c, m in modules.items() for n, p in m.named_parameters()}
    plain = _pixels(gen(_req("a cat")).images[0])
    fused = _pixels(gen(_req("a cat <lora:style_a:1>")).images[0])
    te_off = _pixels(gen(_req("a cat <lora:style_a:0:1>")).images[0])
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # CLIP-L, CLIP-G, T5 each changed by te
        gen(_req("a cat <lora:style_a:1>"))
        assert any(not torch.equal(p, before[f"{name}.{n}"]) for n, p in modules[name].named_parameters()), name
    gen.lora_mode = "hooks"
    try:
        hooks = _pixels(gen(_req("a cat <lora:style_a:1>")).images[0])
    finally:
        gen.lora_mode = "fused"
    assert np.abs(fused - plain).max() > 8, "the LoRA must show"
    assert not np.array_equal(fused, te_off), "the text-encoder parts must show"
    assert np.abs(fused - hooks).max() <= 2
    gen.close()
    for c, m in modules.items():
        assert all(torch.equal(p.detach(), before[f"{c}.{n}"]) for n, p in m.named_parameters()), c
    assert np.array_equal(_pixels(gen(_req("a cat")).images[0]), plain)


def test_mixed_lora_batch_equals_each_request_alone_in_hooks_mode(gen: Generator) -> None:
    reqs = [_req("a cat <lora:style_a:1>", cfg=4.0, negative="blurry"), _req("a dog <lora:style_b:0.7>", seed=2,
                                                                              cfg=4.0)]
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

    from lorakit.generate.init_image import InitImage

    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    keep = gen(_req("a cat", init=InitImage(init, strength=0.0)))
    vae, processor = gen.model.pipe.vae, gen.model.pipe.image_processor
    with torch.no_grad():  # strength 0: the init image through the VAE only
        through = vae.decode(vae.encode(processor.preprocess(init)).latent_dist.mean).sample
    assert np.abs(_pixels(keep.images[0]) - _pixels(processor.postprocess(through, output_type="pil")[0])).max() <= 1
    plain = _pixels(gen(_req("a cat", cfg=3.0)).images[0])
    changed = _pixels(gen(_req("a cat <lora:style_a:1>", cfg=3.0, init=InitImage(init, strength=0.6))).images[0])
    assert changed.shape == (SIZE, SIZE, 3) and not np.array_equal(changed, plain)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    painted = _pixels(gen(_req("a cat", init=InitImage(init, strength=1.0, mask=mask, mask_blur=(0, 0))))
                      .images[0])
    assert np.array_equal(painted[:, SIZE // 2 + 2:], np.asarray(init, dtype=np.int16)[:, SIZE // 2 + 2:])
    with pytest.raises(LorakitError, match="not available on Stable Diffusion 3"):
        gen(_req("a cat", init=InitImage(init, strength=1.0, mask=mask, fill=2)))


def test_loras_of_another_size_or_family_are_refused_with_the_reason(gen: Generator, tmp_path: Path) -> None:
    from lorakit.library.listing import fit

    bases = {e.name: (e.base, fit(e, gen.model.arch)["fit"]) for e in gen.index.entries}
    assert bases == {"style_a": ("sd3-medium", "yes"), "style_b": ("sd3-medium", "yes"), "large": ("sd3.5-large", "no")}
    from lorakit.describe import describe

    info = describe(gen.index.resolve("style_a").path)
    assert (info["architecture"], info["dialect"]) == ("sd3-medium", "kohya")
    with pytest.raises(LorakitError, match="Stable Diffusion 3.5 Large.*Stable Diffusion 3 Medium"):
        gen(_req("a cat <lora:large:1>"))
    from tests.factories import make_kohya_lora, tiny_components

    folder = tmp_path / "sd"
    folder.mkdir()
    save_file(make_kohya_lora(tiny_components("sdxl")), folder / "xl.safetensors")
    other = Generator(gen.model, Library([folder], index=tmp_path / "i.sqlite3"))
    with pytest.raises(LorakitError, match="Stable Diffusion XL.*Stable Diffusion 3"):
        other(_req("a cat <lora:xl:1>"))


def test_sai_single_files_load_offline_and_give_the_same_images(gen: Generator, sd3_dir: Path,
                                                                 tmp_path: Path) -> None:
    from lorakit.tools.checkpoint import vae_to_ldm

    gen.close()  # the base weights, no LoRA fused in
    pipe = gen.model.pipe
    bare = tmp_path / "sd3-tiny.safetensors"
    save_file(sai_state(pipe.transformer), bare)
    with pytest.raises(ModelError, match="--components"):
        load_model(str(bare), device="cpu", dtype="fp32")
    with pytest.raises(ModelError, match="not an SD3 diffusers folder"):
        load_model(str(bare), device="cpu", dtype="fp32", components=str(tmp_path))
    model = load_model(str(bare), device="cpu", dtype="fp32", components=str(sd3_dir))
    assert model.arch == "sd3-medium"
    mine, theirs = model.pipe.transformer.state_dict(), pipe.transformer.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    aio = {f"model.diffusion_model.{k}": v for k, v in sai_state(pipe.transformer).items()}
    for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2),
                          ("t5xxl", pipe.text_encoder_3)):
        aio.update({f"text_encoders.{name}.transformer.{k}": v.clone() * 1.01 for k, v in encoder.state_dict().items()})
    aio.update({"first_stage_model." + vae_to_ldm(k, pipe.vae.config): v.clone()
                for k, v in pipe.vae.state_dict().items()})
    save_file(aio, tmp_path / "sd3-aio.safetensors")
    whole = load_model(str(tmp_path / "sd3-aio.safetensors"), device="cpu", dtype="fp32", components=str(sd3_dir))
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # the file's encoders, not the folder's
        ref = getattr(pipe, name).state_dict()
        assert all(torch.equal(v, ref[k] * 1.01) for k, v in getattr(whole.pipe, name).state_dict().items()), name
    req = _req("a cat <lora:style_b:1>", cfg=3.0)
    assert np.array_equal(_pixels(Generator(model, gen.index)(req).images[0]), _pixels(gen(req).images[0]))


def test_sd35_medium_folder_is_told_by_its_structure(tmp_path: Path) -> None:
    path = tmp_path / "m35"
    tiny_sd3_pipeline(medium35=True).save_pretrained(path)  # type: ignore[attr-defined]
    model = load_model(str(path), device="cpu", dtype="fp32")
    assert model.arch == "sd3.5-medium"
    assert Generator(model, Library([], index=tmp_path / "i.sqlite3")).resolve(Request("a")).settings.steps == 40


def test_cli_generate_and_a1111_api(gen: Generator, sd3_dir: Path, lora_dir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    from lorakit.cli import main
    from lorakit.server.app import create_app

    out = tmp_path / "sd3.png"
    rc = main(["generate", "a cat <lora:style_a:0.9>", "--model", str(sd3_dir), "--lora-dir", str(lora_dir),
               "--steps", "2", "-W", str(SIZE), "-H", str(SIZE), "--seed", "3", "--cfg", "4", "--negative",
               "a dog", "-o", str(out), "--device", "cpu"])
    assert rc == 0
    text = Image.open(out).text["parameters"]  # type: ignore[attr-defined]
    assert "Negative prompt: a dog" in text and "CFG scale: 4" in text and "style_a" in text
    with TestClient(create_app(gen.model, gen.index)) as client:
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:style_b:1>", "negative_prompt": "x",
                                                       "steps": 2, "width": SIZE, "height": SIZE, "seed": 5,
                                                       "cfg_scale": 3})
        assert reply.status_code == 200, reply.text
        assert json.loads(reply.json()["info"])["cfg_scale"] == 3
        bad = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:large:1>", "steps": 2,
                                                     "width": SIZE, "height": SIZE})
        assert bad.status_code == 422 and "Stable Diffusion 3.5 Large" in bad.text
