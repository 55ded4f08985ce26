"""The example LoRAs (trained with ``lorakit train`` on the demo model by examples/train_example_loras.sh): their
effect grows with the weight — each style's statistic at weights 0, 0.25, 0.5, 0.75, 1 is strictly increasing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import lorakit
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import LoraIndex
from lorakit.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
LORAS = ROOT / "examples" / "loras"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
PROMPTS = ("{t}, a red circle", "{t}, a large green square", "{t}, a yellow star on the left")


def _styles() -> object:
    spec = importlib.util.spec_from_file_location("make_training_data", ROOT / "examples" / "make_training_data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep(name: str, trigger: str, stat: object) -> list[float]:
    """The mean statistic over 3 prompts × 2 seeds at each weight."""
    gen = Generator(load_model(None, device="cpu", dtype="fp32"), LoraIndex([LORAS]))
    try:
        out = []
        for w in WEIGHTS:
            values = [stat(image) for p in PROMPTS  # type: ignore[operator]
                      for image in gen(Request(f"{p.format(t=trigger)} <lora:{name}:{w}>", steps=20, width=64,
                                               height=64, seed=1, batch=2)).images]  # seeds 1 and 2
            out.append(sum(values) / len(values))
        return out
    finally:
        gen.close()


@pytest.mark.parametrize("name, trigger, stat, kind", [
    ("blueprint_style", "blueprint", "blueness", "locon"),
    ("sunset_lokr", "sunset", "warmth", "lokr"),
])
def test_example_lora_effect_grows_with_weight(name: str, trigger: str, stat: str, kind: str) -> None:
    lora = lorakit.load_lora(LORAS / f"{name}.safetensors")
    assert lora.arch == "demo" and kind in lora.network_types and trigger in lora.metadata["modelspec.trigger_phrase"]
    values = sweep(name, trigger, getattr(_styles(), stat))
    print(f"{name}: {stat} at weights {WEIGHTS}: {[round(v, 3) for v in values]}")
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] - values[0] > 0.15  # a visible change, not noise
