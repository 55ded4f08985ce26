"""The trained demo model: the synthetic shapes data, the classifier that judges pictures (checked on the
renderer's own pictures), the frozen evaluation set (held-out phrasings and combinations, never changed), the
shipped weights (exact, deterministic), and that the model draws every attribute a prompt asks for."""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit.demo import evalset
from lorakit.demo.captions import HELD_OUT, PHRASINGS, caption, training_captions
from lorakit.demo.classify import classify
from lorakit.demo.evaluate import evaluate
from lorakit.demo.shapes import ATTRIBUTES, COUNT_WORDS, Scene, combinations, held_out, random_scene, render
from lorakit.demo.weights import WEIGHTS
from lorakit.models.loading import BaseModel, demo_components, load_model

TARGET = 0.9  # every attribute, on the frozen set's CI slice (the whole set: benchmarks/demo_eval.py)


@pytest.fixture(scope="module")
def model() -> BaseModel:
    return load_model(None, device="cpu", dtype="fp32")


def test_scenes_render_deterministically() -> None:
    a = [random_scene(np.random.default_rng(7)) for _ in range(3)]
    b = [random_scene(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    assert all(np.array_equal(np.asarray(render(x)), np.asarray(render(y))) for x, y in zip(a, b))
    assert render(a[0]).size == (64, 64)


def test_captions() -> None:
    scene = Scene("circle", "red", "white")
    assert caption(scene, 0) == "a red circle"
    assert caption(scene, HELD_OUT[0]) == "red circle"
    small = Scene("triangle", "orange", "black", size="small", position="left")
    assert caption(small, 0) == "a small orange triangle on the left"
    assert caption(small, "{front}{np}") == "on the left, a small orange triangle"
    assert caption(Scene("star", "blue", "gray", count=2), 1) == "two blue stars on a gray background"
    assert not set(HELD_OUT) & set(PHRASINGS)
    with pytest.raises(ValueError, match="invisible"):
        Scene("circle", "white", "white")


def test_classifier_judges_every_attribute_of_rendered_scenes() -> None:
    """≥ 0.98 on each attribute over 600 rendered pictures (a quarter of them pairs); it is right on all."""
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, pair_share=0.25, keep_held_out=True) for _ in range(600)]
    right: Counter[str] = Counter()
    for scene in scenes:
        judged = classify(render(scene)).attributes()
        right.update(a for a, v in scene.attributes().items() if judged[a] == v)
    assert {a: right[a] / len(scenes) for a in ATTRIBUTES} == {a: 1.0 for a in ATTRIBUTES}


def test_training_scenes_never_have_a_held_out_combination() -> None:
    rng = np.random.default_rng(11)
    assert not any(held_out(random_scene(rng)) for _ in range(3000))
    assert sum(held_out(s) for s in combinations()) == 81  # of 585


def test_evaluation_set_is_frozen_and_held_out() -> None:
    """Unchanged since it was written; each case a held-out combination in a phrasing no training caption of that
    scene has, in words that training captions use; ≥ 240 cases."""
    assert hashlib.sha256(evalset.EVALSET.read_bytes()).hexdigest() == evalset.SHA256
    cases = evalset.load()
    assert len(cases) >= 240 and len({(c.prompt, c.seed) for c in cases}) == len(cases)
    from lorakit.generate.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    words: set[str] = set()
    for scene in combinations("white") + combinations("gray"):
        for text in training_captions(scene):
            words.update(tok.tokenize(text))
    counts = {w: int(n) for n, w in COUNT_WORDS.items()}
    for c in cases:
        e = c.expect
        for background in ([e["background"]] if e["background"] else ["white", "black", "gray"]):
            if background == e["colour"]:
                continue
            scene = Scene(str(e["shape"]), str(e["colour"]), background, str(e["size"]), str(e["position"]),
                          counts[str(e["count"])])
            assert held_out(scene), c
            assert c.prompt not in training_captions(scene), c
        assert set(tok.tokenize(c.prompt)) <= words, c


def test_shipped_weights_load_exactly_and_deterministically(model: BaseModel) -> None:
    first, second = demo_components(), demo_components()
    stored = load_file(str(WEIGHTS))
    for name in ("unet", "text_encoder", "vae"):
        a, b = first[name].state_dict(), second[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs between loads"
            assert torch.equal(a[key], stored[f"{name}.{key}"].float()), f"{name}.{key} is not the shipped value"
    assert model.hash == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:10]
    assert model.pipe.unet.lorakit_arch == model.pipe.text_encoder.lorakit_arch == "demo"


@pytest.mark.xfail(reason="the shipped model predates the evaluation set (its baseline: docs/training.md)",
                   strict=True)  # a model that passes makes this fail: then drop the mark
def test_demo_model_draws_every_attribute_asked_for(model: BaseModel) -> None:
    start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and never stalls on a busy machine
    try:
        report = evaluate(model, evalset.ci_slice(evalset.load()))
    finally:
        torch.set_num_threads(threads)
    print("misses:", *report.misses, sep="\n  ")
    print(report.table())
    print(f"({time.time() - start:.1f}s; target {TARGET} on each attribute)")
    assert {a: report.accuracy(a) >= TARGET for a in ATTRIBUTES} == {a: True for a in ATTRIBUTES}


@pytest.mark.xfail(reason="the shipped model (measured 2026-12-06, seed 1): two small blue stars -> circles, "
                          "'on a black background' -> a coloured field, blueprint's star on the right; "
                          "docs/training.md", strict=True)
def test_the_readme_prompts_come_true(model: BaseModel, tmp_path: Path) -> None:
    """The README's prompts (seed 1, defaults): every word they say is drawn; with blueprint_style (white shapes on
    blue) the shape and place still are."""
    from lorakit.generate.pipeline import Generator, Request
    from lorakit.library import Library

    examples = Path(__file__).resolve().parents[1] / "examples" / "loras"
    asked = {"a yellow star on the left": {"colour": "yellow", "shape": "star", "position": "left", "count": "one"},
             "two small blue stars": {"colour": "blue", "shape": "star", "count": "two", "size": "small"},
             "a large yellow square on a black background": {"colour": "yellow", "shape": "square", "size": "large",
                                                             "background": "black"},
             "blueprint, a yellow star on the left <lora:blueprint_style:1>": {"shape": "star", "position": "left",
                                                                                "count": "one"}}
    gen = Generator(model, Library([examples], index=tmp_path / "index.sqlite3"))
    try:
        for prompt, want in asked.items():
            judged = classify(gen(Request(prompt, seed=1)).images[0]).attributes()
            assert {k: judged[k] for k in want} == want, prompt
    finally:
        gen.close()



class _ShiftingVae:
    """encode → decode that gives the picture back with ``shift`` (in [-1, 1] units) added to its red channel."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def encode(self, x: torch.Tensor) -> object:
        return type("Enc", (), {"latent_dist": type("Dist", (), {"mean": x})()})()

    def decode(self, z: torch.Tensor) -> object:
        out = z.clone()
        out[:, 0] += self.shift
        return type("Dec", (), {"sample": out})()


def test_roundtrip_measures_how_far_flat_colours_come_back() -> None:
    """roundtrip.errors: 0 for a VAE that gives the picture back; a red shift of 0.2 (in [-1, 1]) is 0.1 of the
    RGB range on the background and inside the shape alike, whatever the scene."""
    from lorakit.demo.roundtrip import errors, picture, random_pictures

    pictures = random_pictures(6, seed=2)
    bg, fg = errors(_ShiftingVae(0.0), pictures)
    assert bg.shape == fg.shape == (6,) and bg.max() < 1e-6 and fg.max() < 1e-6
    grey = [picture(Scene(s, "red", "white", size="large"), (100, 100, 100), (40, 40, 40)) for s in ("circle", "star")]
    bg, fg = errors(_ShiftingVae(0.2), grey)
    assert np.allclose(bg, 0.1, atol=1e-3) and np.allclose(fg, 0.1, atol=1e-3)
    assert all(p.inside.any() and p.outside.any() and not (p.inside & p.outside).any() for p in grey)


def test_demo_model_samples_with_the_prediction_its_folder_names(tmp_path: Path) -> None:
    """demo.json's prediction_type (a v-prediction candidate) sets the scheduler's; absent, ε as shipped."""
    import json
    import shutil

    from lorakit.demo.weights import DATA_DIR, META
    from lorakit.models.loading import demo_model

    shutil.copytree(DATA_DIR, tmp_path / "v")
    meta = json.loads((tmp_path / "v" / META.name).read_text())
    assert "prediction_type" not in meta
    (tmp_path / "v" / META.name).write_text(json.dumps({**meta, "prediction_type": "v_prediction"}))
    assert demo_model(tmp_path / "v").pipe.scheduler.config.prediction_type == "v_prediction"
    assert demo_model().pipe.scheduler.config.prediction_type == "epsilon"
