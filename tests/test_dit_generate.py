"""Generation on Chroma and Qwen-Image from tiny pipelines saved as diffusers folders, offline: family defaults,
LoRA tags (a FLUX.1 LoRA on Chroma with its pruned layers reported; a Qwen-Image LoRA), fused = hooks, exact
restore, real/true CFG with the negative prompt, and (Qwen-Image: prompts of their own lengths) mixed-LoRA batches
equal to each request alone."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.models.loading import load_model
from tests.flux_factories import bfl_lora, kohya_keys, tiny_flux_transformer
from tests.qwen_factories import kohya_name, qwen_lora

SIZE = 64


def _generator(folder: Path, loras: Path, index: Path) -> Generator:
    return Generator(load_model(str(folder), device="cpu", dtype="fp32"), Library([loras], index=index))


def _strong(layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Strong enough to show in a 64 px picture of a random model."""
    return {m: {k: (v * 20 if k == "lora_up.weight" else v) for k, v in ls.items()} for m, ls in layers.items()}


@pytest.fixture(scope="module")
def chroma(tiny_chroma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Generator:
    loras = tmp_path_factory.mktemp("chroma_loras")
    save_file(kohya_keys(_strong(bfl_lora(tiny_flux_transformer(), "lora", seed=1))), loras / "flux_style.safetensors",
              {"ss_base_model_version": "flux1"})
    return _generator(tiny_chroma_dir, loras, tmp_path_factory.mktemp("ci") / "i.sqlite3")


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Generator:
    loras = tmp_path_factory.mktemp("qwen_loras")
    tr = load_model(str(tiny_qwen_dir), device="cpu", dtype="fp32").pipe.transformer
    for name, seed in (("style_a", 1), ("style_b", 2)):
        layers = _strong(qwen_lora(tr, "lora", seed=seed))
        save_file({f"{kohya_name(m)}.{k}": v for m, ls in layers.items() for k, v in ls.items()},
                  loras / f"{name}.safetensors", {"ss_base_model_version": "qwen_image"})
    return _generator(tiny_qwen_dir, loras, tmp_path_factory.mktemp("qi") / "i.sqlite3")


def _req(prompt: str, **kw: object) -> Request:
    base: dict[str, object] = dict(steps=2, width=SIZE, height=SIZE, seed=1)
    base.update(kw)
    return Request(prompt, **base)  # type: ignore[arg-type]


def _pixels(gen: Generator, req: Request) -> np.ndarray:
    return np.asarray(gen(req).images[0], dtype=np.int16)


def _lora_shows_fused_equals_hooks_restore_exact(gen: Generator, tag: str) -> None:
    tr = gen.model.pipe.transformer
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    plain = _pixels(gen, _req("a cat"))
    fused = _pixels(gen, _req(f"a cat {tag}"))
    gen.lora_mode = "hooks"
    try:
        hooks = _pixels(gen, _req(f"a cat {tag}"))
    finally:
        gen.lora_mode = "fused"
    assert np.abs(fused - plain).max() > 8, "the LoRA must show"
    assert np.abs(fused - hooks).max() <= 2
    gen.close()
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())
    assert np.array_equal(_pixels(gen, _req("a cat")), plain)


def _cfg_reads_the_negative_prompt(gen: Generator) -> None:
    one = _pixels(gen, _req("a cat", negative="a dog", cfg=1.0))
    assert np.array_equal(one, _pixels(gen, _req("a cat", negative="a bird", cfg=1.0))), "cfg 1: not read"
    dog = _pixels(gen, _req("a cat", negative="a dog", cfg=4.0))
    assert not np.array_equal(dog, _pixels(gen, _req("a cat", negative="a bird", cfg=4.0)))
    assert not np.array_equal(one, dog)


def test_chroma_defaults_lora_report_cfg(chroma: Generator, caplog: pytest.LogCaptureFixture) -> None:
    assert chroma.model.arch == "chroma"
    job = chroma.resolve(Request("a cat"))
    assert (job.settings.steps, job.settings.cfg, job.settings.sampler, job.settings.guidance) == (26, 4.0, "Euler",
                                                                                                 None)
    with caplog.at_level(logging.INFO, logger="lorakit"):
        _lora_shows_fused_equals_hooks_restore_exact(chroma, "<lora:flux_style:1>")
    assert "not in this model, not applied: " in caplog.text and "norm1_context.linear" in caplog.text
    _cfg_reads_the_negative_prompt(chroma)
    with pytest.raises(LorakitError, match="unknown sampler 'DPM\\+\\+ 2M' for Chroma"):
        chroma(_req("a cat", sampler="DPM++ 2M"))


def test_qwen_defaults_lora_true_cfg(qwen: Generator) -> None:
    assert qwen.model.arch == "qwen-image"
    job = qwen.resolve(Request("a cat"))
    assert (job.settings.steps, job.settings.cfg, job.settings.sampler) == (30, 4.0, "Euler")
    _lora_shows_fused_equals_hooks_restore_exact(qwen, "<lora:style_a:1>")
    _cfg_reads_the_negative_prompt(qwen)
    text = qwen(_req("a cat <lora:style_b:0.5>", negative="a dog")).infotexts[0]
    assert "CFG scale: 4" in text and "Lora hashes" in text


def test_qwen_mixed_lora_batch_of_prompts_of_different_lengths_equals_each_alone(qwen: Generator) -> None:
    reqs = [_req("a cat <lora:style_a:1>", negative="blurry"), _req("a dog on a long red sofa <lora:style_b:0.7>",
            seed=2, negative="blurry"), _req("a bird", seed=3, negative="blurry")]
    batched = qwen.run_batch(reqs)
    qwen.lora_mode = "hooks"
    try:
        alone = [qwen(r) for r in reqs]
    finally:
        qwen.lora_mode = "fused"
    for b, a in zip(batched, alone):
        assert not isinstance(b, LorakitError), b
        assert np.abs(np.asarray(b.images[0], dtype=np.int16) - np.asarray(a.images[0], dtype=np.int16)).max() <= 2
