"""Real FLUX.1 LoRA key sets on the full-size models: FLUX.1 dev / schnell / control transformers, CLIP-L and T5-XXL
built on the ``meta`` device (``models/flux_configs.py``), LoRAs from the listings of real files
(``tests/fixtures/flux_listings``) as zero-stride tensors. Every layer must resolve onto a module of the right shape
(``build_plan``), a few mapped paths are checked by hand, and the misfits are refused with the reason."""
from __future__ import annotations

import inspect

import pytest
import torch

from lorakit import lora_model
from lorakit.errors import IncompatibleLora, InvalidLora
from lorakit.lora_model import LoraModel, lora_from_state_dict
from lorakit.models.flux_configs import FLUX1_VARIANTS, build_flux_components
from lorakit.patch.plan import build_plan
from lorakit.patch.weights import Weight
from tests.flux_fixtures import FLUX_BASES, load_listing, zero_state_dict

Components = dict[str, torch.nn.Module]
DIALECTS = {"kohya": "kohya", "kohya_te1": "kohya", "diffusers": "peft", "diffusers_no_proj_mlp": "peft",
            "diffusers_base_model": "peft", "diffusers_norm_out": "peft", "aitoolkit": "peft",
            "onetrainer_dora": "kohya", "xlabs": "xlabs", "control": "peft", "lokr_bfl": "comfyui"}
# Model modules each listing changes (hand-counted: 19 double blocks × 14 + 38 single × 6 = 494 for a kohya file
# of every block layer; CLIP-L 12 layers × 6; T5 24 blocks × 7).
LAYERS = {"kohya": {"transformer": 494}, "kohya_te1": {"transformer": 494, "text_encoder": 72},
          "diffusers": {"transformer": 494}, "diffusers_no_proj_mlp": {"transformer": 342},
          "diffusers_base_model": {"transformer": 381}, "diffusers_norm_out": {"transformer": 504},
          "aitoolkit": {"transformer": 418}, "xlabs": {"transformer": 24},
          "onetrainer_dora": {"transformer": 266, "text_encoder": 72, "text_encoder_2": 168},
          "control": {"transformer": 656}, "lokr_bfl": {"transformer": 11}}


@pytest.fixture(autouse=True)
def _cheap_finite_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NaN/inf check at load, on the tensors' own elements: a zero-stride (expanded) dimension repeats the same
    ones, so one index of it is checked (as many values as the file's, not the 170 M of its full-size shapes)."""
    finite = lora_model.all_finite

    def own_elements(t: torch.Tensor) -> bool:
        return finite(t[tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())])

    monkeypatch.setattr(lora_model, "all_finite", own_elements)


@pytest.fixture(scope="module")
def models() -> dict[str, Components]:
    return {v: build_flux_components(v) for v in ("flux-1-dev", "flux-1-schnell", "flux-1-dev-control")}


def _load(name: str) -> LoraModel:
    listing = load_listing(name)
    return lora_from_state_dict(zero_state_dict(listing["shapes"]), listing["metadata"], name=name)


def _model_for(base: str) -> str:
    return "flux-1-dev-control" if base == "flux-1-dev-control" else "flux-1-dev"


def test_full_size_models_have_flux1_dev_shapes(models: dict[str, Components]) -> None:
    dev = models["flux-1-dev"]
    tr = dev["transformer"]
    assert all(p.is_meta for p in tr.parameters())
    assert (len(tr.transformer_blocks), len(tr.single_transformer_blocks)) == (19, 38)
    assert tuple(tr.get_submodule("single_transformer_blocks.0.proj_mlp").weight.shape) == (12288, 3072)
    assert tuple(tr.get_submodule("single_transformer_blocks.0.proj_out").weight.shape) == (3072, 15360)
    assert tuple(tr.norm_out.linear.weight.shape) == (6144, 3072)
    assert tuple(tr.context_embedder.weight.shape) == (3072, 4096)
    assert tuple(tr.time_text_embed.text_embedder.linear_1.weight.shape) == (3072, 768)
    assert tr.time_text_embed.guidance_embedder.linear_1.weight.shape[1] == 256
    assert not hasattr(models["flux-1-schnell"]["transformer"].time_text_embed, "guidance_embedder")
    assert tuple(models["flux-1-dev-control"]["transformer"].x_embedder.weight.shape) == (3072, 128)
    assert tuple(models["flux-1-dev-control"]["transformer"].proj_out.weight.shape) == (64, 3072)
    t5 = dev["text_encoder_2"]
    assert len(t5.encoder.block) == 24
    assert tuple(t5.get_submodule("encoder.block.23.layer.1.DenseReluDense.wi_1").weight.shape) == (10240, 4096)
    assert tuple(t5.get_submodule("encoder.block.0.layer.0.SelfAttention.q").weight.shape) == (4096, 4096)
    assert tuple(dev["text_encoder"].get_submodule("encoder.layers.11.mlp.fc1").weight.shape) == (3072, 768)


def test_variant_configs_differ_from_diffusers_defaults_only_in_guidance_and_channels() -> None:
    """diffusers' ``FluxTransformer2DModel`` defaults are FLUX.1's shapes (schnell's: no guidance embedder)."""
    from diffusers import FluxTransformer2DModel

    params = inspect.signature(FluxTransformer2DModel.__init__).parameters
    defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default for k, p in params.items()}
    for variant, config in FLUX1_VARIANTS.items():
        assert set(config) <= set(defaults)
        differ = {k for k, v in config.items() if v != defaults[k]}
        assert differ <= {"guidance_embeds", "in_channels", "out_channels"}, (variant, differ)


@pytest.mark.parametrize("name", sorted(FLUX_BASES))
def test_every_layer_of_every_listing_resolves_on_full_size_flux(models: dict[str, Components], name: str) -> None:
    lora = _load(name)
    assert lora.leftovers == [] and lora.arch == "flux1" and lora.dialect == DIALECTS[name]
    assert lora.base == FLUX_BASES[name]
    plan = build_plan(models[_model_for(lora.base)], [(lora, Weight())])
    report = plan.reports[0]
    assert report.unmatched == [] and report.patched == LAYERS[name]
    assert set(plan.modules) == set(lora.layers)


def _up(lora: LoraModel, path: str) -> torch.Tensor:
    return lora.layers[path].leaves()["lora_up.weight"]


def test_kohya_fused_layers_split_onto_the_right_modules_and_rows() -> None:
    """``single_blocks_5_linear1`` (21504 rows) → to_q/to_k/to_v/proj_mlp of single block 5 (3072, 3072, 3072,
    12288 rows of the one ``up``, ``down`` shared); ``double_blocks_3_txt_attn_qkv`` → add_q/k/v_proj of block 3."""
    listing = load_listing("kohya")
    sd = zero_state_dict(listing["shapes"], torch.float32)
    up = torch.arange(21504 * 16, dtype=torch.float32).reshape(21504, 16)
    key = "lora_unet_single_blocks_5_linear1."
    sd[key + "lora_up.weight"] = up
    qkv = torch.arange(9216 * 16, dtype=torch.float32).reshape(9216, 16)
    sd["lora_unet_double_blocks_3_txt_attn_qkv.lora_up.weight"] = qkv
    lora = lora_from_state_dict(sd, {})
    s = "transformer.single_transformer_blocks.5."
    edges = {"attn.to_q": (0, 3072), "attn.to_k": (3072, 6144), "attn.to_v": (6144, 9216), "proj_mlp": (9216, 21504)}
    for part, (a, b) in edges.items():
        assert torch.equal(_up(lora, s + part), up[a:b]), part
        assert lora.layers[s + part].widths() == (b - a, 3072)
        assert lora.layers[s + part].leaves()["lora_down.weight"] is sd[key + "lora_down.weight"]
    d = "transformer.transformer_blocks.3.attn."
    for i, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        assert torch.equal(_up(lora, d + part), qkv[3072 * i:3072 * (i + 1)])
    assert "transformer.single_transformer_blocks.5.norm.linear" in lora.layers  # modulation_lin
    assert "transformer.transformer_blocks.18.norm1_context.linear" in lora.layers  # txt_mod_lin


def test_control_lora_final_layer_swaps_halves_of_up_and_bias_and_sets_norm_scales() -> None:
    """BFL ``final_layer.adaLN_modulation.1`` [shift; scale] → ``norm_out.linear`` [scale; shift]: the rows of
    ``lora_B`` and of its bias swap, ``lora_A`` does not; q/k norm scales replace the RMSNorm weights."""
    listing = load_listing("control")
    sd = zero_state_dict(listing["shapes"], torch.float32)
    up = torch.arange(6144 * 128, dtype=torch.float32).reshape(6144, 128)
    bias = torch.arange(6144, dtype=torch.float32)
    down = torch.arange(128 * 3072, dtype=torch.float32).reshape(128, 3072)
    key = "final_layer.adaLN_modulation.1."
    sd.update({key + "lora_B.weight": up, key + "lora_B.bias": bias, key + "lora_A.weight": down})
    lora = lora_from_state_dict(sd, {})
    norm_out = lora.layers["transformer.norm_out.linear"].leaves()
    assert torch.equal(norm_out["lora_up.weight"], torch.cat([up[3072:], up[:3072]]))
    assert torch.equal(norm_out["lora_up.bias"], torch.cat([bias[3072:], bias[:3072]]))
    assert torch.equal(norm_out["lora_down.weight"], down)
    assert lora.layers["transformer.proj_out"].widths() == (64, 3072)  # final_layer.linear
    assert lora.layers["transformer.x_embedder"].widths() == (3072, 128)  # img_in
    assert lora.layers["transformer.transformer_blocks.7.attn.norm_added_k"].kind == "set"  # txt_attn key_norm
    assert lora.layers["transformer.single_transformer_blocks.37.attn.norm_q"].kind == "set"


def test_text_encoder_keys_reach_clip_l_and_t5_xxl(models: dict[str, Components]) -> None:
    te1, dora = _load("kohya_te1"), _load("onetrainer_dora")
    assert lora_layers_of(te1, "text_encoder") == lora_layers_of(dora, "text_encoder") == 72
    assert "text_encoder.encoder.layers.11.self_attn.out_proj" in te1.layers
    assert "text_encoder_2.encoder.block.23.layer.1.DenseReluDense.wi_0" in dora.layers  # OneTrainer's lora_te2_ = T5
    assert dora.network_types == ["dora(lora)"]
    assert "transformer.single_transformer_blocks.37.attn.to_v" in dora.layers  # lora_transformer_…


def lora_layers_of(lora: LoraModel, component: str) -> int:
    return lora.modules_per_component().get(component, 0)


def test_xlabs_streams_map_to_image_and_text_attention() -> None:
    lora = _load("xlabs")
    assert {p for p in lora.layers if ".0." in p} == {
        f"transformer.transformer_blocks.0.attn.{m}" for m in
        ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}


def test_diffusers_layout_norm_out_is_not_swapped() -> None:
    """A diffusers-layout file's ``norm_out.linear`` is the model's own layer: taken as it is."""
    listing = load_listing("diffusers_norm_out")
    sd = zero_state_dict(listing["shapes"], torch.float32)
    up = torch.arange(6144 * 64, dtype=torch.float32).reshape(6144, 64)
    sd["transformer.norm_out.linear.lora_B.weight"] = up
    assert torch.equal(_up(lora_from_state_dict(sd, {}), "transformer.norm_out.linear"), up)


def test_control_lora_on_a_64_channel_model_widens_x_embedder(models: dict[str, Components]) -> None:
    """A control LoRA's ``img_in`` reads 128 channels (latents + control image): on dev/schnell (64 inputs) the plan
    widens ``x_embedder`` to 128 (ROUND3_NOTES R8, ``patch/expand.py``) instead of refusing it, on the meta model."""
    lora = _load("control")
    for variant in ("flux-1-dev", "flux-1-schnell"):
        plan = build_plan(models[variant], [(lora, Weight())])
        assert plan.expansions == {"transformer.x_embedder": 128}
        assert "transformer.x_embedder" in plan.modules


def test_dev_lora_on_schnell_reports_the_guidance_layers(models: dict[str, Components]) -> None:
    """Hyper-FLUX changes the guidance embedder, which schnell lacks: reported as not in the model, the rest
    applies."""
    report = build_plan(models["flux-1-schnell"], [(_load("diffusers_norm_out"), Weight())]).reports[0]
    assert report.unmatched == [f"transformer.time_text_embed.guidance_embedder.linear_{i}" for i in (1, 2)]
    assert report.patched == {"transformer": 502}


def test_listings_that_are_not_flux1_files_are_refused() -> None:
    """InvokeAI's LoKr listing (synthetic factor shapes: kron is 1024 rows, no FLUX layer's). Its two Qwen-Image
    listings are Qwen-Image's now (kohya: Qwen-Image; prefix-less diffusers names with kohya leaves: FLUX.1 that
    Chroma and Qwen-Image models take too): tests/test_dit_fullsize.py."""
    with pytest.raises(InvalidLora, match=r"double_blocks\.0\.img_attn\.qkv: cannot split .*1024 rows"):
        _load("lokr_bfl_invokeai")
    assert _load("qwen_kohya").arch == "qwen-image" and _load("qwen_diffusers").also_fits == ("chroma", "qwen-image")
