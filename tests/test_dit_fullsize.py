"""Chroma and Qwen-Image LoRA key sets on the full-size transformers built on the ``meta`` device (diffusers'
default configs: Chroma 19 double + 38 single blocks of 3072, Qwen-Image 60 blocks of 3072 reading Qwen2.5-VL-7B's
3584): real FLUX.1 listings (``tests/fixtures/flux_listings``) on Chroma with what Chroma pruned reported, the
Qwen-Image listings and every Qwen-Image dialect at full size resolve onto modules of the right shape
(``build_plan``), misfits refused with the reason."""
from __future__ import annotations

import pytest
import torch

from lorakit.errors import IncompatibleLora
from lorakit.lora_model import LoraModel, lora_from_state_dict
from lorakit.patch.plan import build_plan
from lorakit.patch.weights import Weight
from tests.flux_fixtures import FLUX_BASES, load_listing, zero_state_dict
from tests.qwen_factories import qwen_table
from tests.test_flux_fullsize import LAYERS, _cheap_finite_check  # noqa: F401 (an autouse fixture)
from tests.test_qwen import DIALECTS, _dialect

Components = dict[str, torch.nn.Module]
PRUNED = ("norm1.linear", "norm1_context.linear", "norm.linear", "time_text_embed.", "norm_out.linear")


@pytest.fixture(scope="module")
def chroma() -> Components:
    from diffusers import ChromaTransformer2DModel

    with torch.device("meta"):
        return {"transformer": ChromaTransformer2DModel()}


@pytest.fixture(scope="module")
def qwen() -> Components:
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return {"transformer": QwenImageTransformer2DModel()}


def _load(name: str, metadata: dict[str, str] | None = None) -> LoraModel:
    listing = load_listing(name)
    return lora_from_state_dict(zero_state_dict(listing["shapes"]), metadata or listing["metadata"], name=name)


@pytest.mark.parametrize("name", sorted(n for n in FLUX_BASES if n != "control"))
def test_every_flux_listing_resolves_on_full_size_chroma_with_the_pruned_layers_reported(chroma: Components,
                                                                                          name: str) -> None:
    lora = _load(name)
    plan = build_plan(chroma, [(lora, Weight())])
    report = plan.reports[0]
    pruned = [p for p in report.unmatched if p.startswith("transformer.")]
    assert all(any(m in p for m in PRUNED) for p in pruned), pruned
    assert report.patched["transformer"] + len(pruned) == LAYERS[name]["transformer"]
    assert len(plan.modules) + len(report.unmatched) == len(lora.layers)
    # FLUX.1's CLIP-L (text_encoder) and T5 (text_encoder_2, Chroma's text_encoder: renamed) layers find no module
    # on this transformer-only stand-in: reported, not applied
    assert {p.split(".", 1)[0] for p in report.unmatched} <= {"transformer", "text_encoder"}


def test_full_size_qwen_image_has_the_module_table(qwen: Components) -> None:
    tr = qwen["transformer"]
    assert tr.get_submodule("transformer_blocks.59.img_mod.1").weight.shape == (6 * 3072, 3072)
    assert tr.get_submodule("txt_in").weight.shape == (3072, 3584)
    assert all(tr.get_submodule(m) is not None for m in qwen_table(60))


def _full_size_layers(tr: torch.nn.Module, rank: int = 16) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for m in qwen_table(60):
        o, i = tr.get_submodule(m).weight.shape
        out[m] = {"lora_down.weight": torch.zeros(()).expand(rank, i),
                  "lora_up.weight": torch.zeros(()).expand(o, rank),
                  "alpha": torch.tensor(8.0)}
    return out


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialect_resolves_on_full_size_qwen_image(qwen: Components, dialect: str) -> None:
    layers = _full_size_layers(qwen["transformer"])
    lora = lora_from_state_dict(_dialect(dialect, layers), {}, name=dialect)
    assert (lora.arch, lora.leftovers) == ("qwen-image", [])
    plan = build_plan(qwen, [(lora, Weight())])
    assert plan.reports[0].unmatched == [] and plan.reports[0].patched == {"transformer": 60 * 14 + 6}


def test_qwen_listings(qwen: Components) -> None:
    """InvokeAI's diffusers-format listing names only to_q/to_k of two blocks: no key or shape tells it from FLUX.1,
    so it is read as FLUX.1 that Chroma and Qwen-Image models take too (the report says so), or as Qwen-Image where
    metadata says; metadata naming FLUX.1 makes it FLUX.1's only. Its kohya LoKr listing has synthetic shapes
    (kron(w1, w2) is 49152 × 49152): refused naming the layer."""
    plain = _load("qwen_diffusers")
    assert (plain.arch, plain.also_fits) == ("flux1", ("chroma", "qwen-image"))
    report = build_plan(qwen, [(plain, Weight())]).reports[0]
    assert report.unmatched == [] and report.patched == {"transformer": len(plain.layers)}
    assert "its keys fit FLUX.1 and Qwen-Image, no metadata says which: applied as Qwen-Image" in report.line()
    flux = _load("qwen_diffusers", {"ss_base_model_version": "flux1"})
    with pytest.raises(IncompatibleLora, match="this LoRA is for FLUX.1, the model is Qwen-Image"):
        build_plan(qwen, [(flux, Weight())])
    named = _load("qwen_diffusers", {"modelspec.architecture": "qwen-image/lora"})
    plan = build_plan(qwen, [(named, Weight())])
    assert named.arch == "qwen-image" and plan.reports[0].unmatched == [] and set(plan.modules) == set(named.layers)
    lokr = _load("qwen_kohya")
    assert lokr.arch == "qwen-image" and lokr.network_types == ["lokr"]
    with pytest.raises(IncompatibleLora, match="transformer.transformer_blocks.0.attn.to_k"):
        build_plan(qwen, [(lokr, Weight())])
