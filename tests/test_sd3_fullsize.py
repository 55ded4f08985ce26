"""Full-size SD3-Medium, SD3.5-Medium and SD3.5-Large on the ``meta`` device: a file of every dialect (from the
key → shape listings of tests/sd3_listings.py, filled with zeros) resolves every key onto a module of the right
shape, the size is told from the file (shapes, ``attn2``, metadata), and a LoRA of one size is refused on another
with the reason — before anything changes."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import lorakit
from lorakit.errors import IncompatibleLora
from lorakit.keymap import detection, families
from lorakit.models.sd3_configs import build_components
from lorakit.patch.plan import build_plan
from tests.sd3_listings import DIALECTS, SIZES, listing, zeros

# What each dialect's file is read as, per size: SD3-Medium and 3.5-Medium are both 1536 wide, so a file without
# attn2 keys or metadata is "either Medium" (sd3.x-medium), which fits both.
EXPECTED = {
    "sd3-medium": {"kohya": "sd3-medium", "kohya-split-qkv": "sd3-medium"},
    "sd3.5-medium": {},
    "sd3.5-large": {},
}


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, Any]]:
    return {name: build_components(name) for name in SIZES}


def _expected(size: str, dialect: str) -> str:
    if size in ("sd3.5-medium", "sd3.5-large"):
        return size  # attn2 keys, or 2432 wide
    return EXPECTED[size].get(dialect, "sd3.x-medium")


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialect_covers_the_full_size_model(models: dict[str, dict[str, Any]], size: str,
                                                  dialect: str) -> None:
    shapes, meta = listing(dialect, SIZES[size])
    assert detection.detect(list(shapes), meta, {k: torch.empty(s, device="meta") for k, s in shapes.items()}) \
        is families.SD3
    lora = lorakit.lora_from_state_dict(zeros(shapes), meta, name=f"{dialect}-{size}")
    assert lora.leftovers == [] and lora.arch == _expected(size, dialect), (lora.leftovers[:3], lora.arch)
    report = build_plan(models[size], [(lora, lorakit.as_weight(1.0))]).reports[0]
    assert report.unmatched == [], report.unmatched[:3]
    assert sum(report.patched.values()) == len(lora.layers)


@pytest.mark.parametrize("lora_size,model_size", [("sd3-medium", "sd3.5-large"), ("sd3.5-large", "sd3-medium"),
                                                  ("sd3.5-medium", "sd3-medium"), ("sd3-medium", "sd3.5-medium")])
def test_a_lora_of_another_size_is_refused_with_the_reason(models: dict[str, dict[str, Any]], lora_size: str,
                                                           model_size: str) -> None:
    shapes, meta = listing("kohya", SIZES[lora_size])
    lora = lorakit.lora_from_state_dict(zeros(shapes), meta, name="x")
    names = {"sd3-medium": "Stable Diffusion 3 Medium", "sd3.5-medium": "Stable Diffusion 3.5 Medium",
             "sd3.5-large": "Stable Diffusion 3.5 Large"}
    with pytest.raises(IncompatibleLora, match=f"for {names[lora_size]}, the model is {names[model_size]}"):
        build_plan(models[model_size], [(lora, lorakit.as_weight(1.0))])


def test_an_either_medium_lora_fits_both_mediums_not_large(models: dict[str, dict[str, Any]]) -> None:
    shapes, _ = listing("diffusers", SIZES["sd3-medium"])
    lora = lorakit.lora_from_state_dict(zeros(shapes), {}, name="m")
    assert lora.arch == "sd3.x-medium"
    for size in ("sd3-medium", "sd3.5-medium"):
        build_plan(models[size], [(lora, lorakit.as_weight(1.0))])
    with pytest.raises(IncompatibleLora, match="Stable Diffusion 3 or 3.5 Medium, the model is Stable Diffusion 3.5"):
        build_plan(models["sd3.5-large"], [(lora, lorakit.as_weight(1.0))])


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_library_reads_the_size_from_the_header_ends(size: str, dialect: str) -> None:
    """What ``lorakit list`` / the page say (the first and last ~30 header entries, torch-free), and the fit."""
    import json

    from lorakit.library.listing import incompatibility
    from lorakit.library.summary import sample_keys, summarise_keys

    shapes, meta = listing(dialect, SIZES[size])
    body = json.dumps({k: {"dtype": "F16", "shape": list(s), "data_offsets": [0, 0]} for k, s in
                       sorted(shapes.items())}, separators=(",", ":"))
    summary = summarise_keys(sample_keys(body[1:], body), body, None, meta, lambda key: None, by_metadata=False)
    # a LoKr header shows no factor whose width is the hidden one: any SD3 size (loading it then decides)
    expected = "sd3" if dialect == "lycoris" and size != "sd3.5-medium" else _expected(size, dialect)
    assert summary.base == expected
    for model in SIZES:
        assert (incompatibility(summary.base, model) is None) == (expected in (model, "sd3") or
                                                                  expected == "sd3.x-medium" and "medium" in model)
