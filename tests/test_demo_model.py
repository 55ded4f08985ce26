"""The trained demo model: the synthetic shapes data, the classifier that judges pictures (checked on the
renderer's own pictures), the frozen evaluation set (held-out phrasings and combinations, never changed), the
shipped weights (exact, deterministic), and that the model draws every attribute a prompt asks for."""
from __future__ import annotations

import hashlib
import time
from collections import Counter

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


@pytest.mark.xfail(reason="the shipped model predates the evaluation set (its baseline: docs/training.md)")
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
