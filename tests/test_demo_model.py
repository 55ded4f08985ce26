"""The trained demo model: the synthetic shapes data, the classifier that judges pictures, the shipped weights
(exact, deterministic), and that the model draws the colour and shape a prompt asks for — in phrasings it was
trained on and in ones it was not."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit.demo.classify import classify
from lorakit.demo.evaluate import cases, evaluate
from lorakit.demo.shapes import HELD_OUT, PHRASINGS, Scene, caption, random_scene, render
from lorakit.demo.weights import WEIGHTS
from lorakit.models.loading import BaseModel, demo_components, load_model

# The targets are colour ≥ 0.9 and shape ≥ 0.8. The shipped model measures colour 0.917, shape 0.938 on
# these 48 images (Euler a, 20 steps, CFG 7; its misses: orange as red, pink as white), deterministic for a torch
# version on a CPU.
TARGETS = {"colour": 0.9, "shape": 0.8}
FLOORS = {"colour": 0.9, "shape": 0.8}


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
    assert caption(scene, HELD_OUT[1]) == "a circle, red"
    small = Scene("triangle", "orange", "black", size="small", position="left")
    assert caption(small, 0) == "a small orange triangle on the left"
    assert caption(Scene("star", "blue", "gray", count=2), 1) == "two blue stars on a gray background"
    assert not set(HELD_OUT) & set(PHRASINGS)
    with pytest.raises(ValueError, match="invisible"):
        Scene("circle", "white", "white")


def test_classifier_is_right_on_rendered_scenes() -> None:
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, pair_share=0.0) for _ in range(300)]
    judged = [classify(render(s)) for s in scenes]
    assert [j.colour for j in judged] == [s.colour for s in scenes]
    assert [j.shape for j in judged] == [s.shape for s in scenes]


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


def test_demo_model_draws_the_colour_and_shape_asked_for(model: BaseModel) -> None:
    start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and never stalls on a busy machine
    try:
        scores = evaluate(model, seeds=(1, 2), steps=20, cases_=cases(24))  # 48 images, half held-out phrasings
    finally:
        torch.set_num_threads(threads)
    print("misses:", *scores["all"].misses, sep="\n  ")
    for name, s in scores.items():
        print(s.line(name))
    print(f"({time.time() - start:.1f}s; targets {TARGETS})")
    total = scores["all"]
    assert total.n >= 48
    assert total.colour / total.n >= FLOORS["colour"]
    assert total.shape / total.n >= FLOORS["shape"]
