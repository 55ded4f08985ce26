"""FLUX.1 LoRAs on a tiny FLUX.1 transformer (2 double, 3 single blocks; h=32, mlp=128): every network type on
every BFL layer against an independent fused reference (tests/flux_factories.py), every dialect, text encoders,
family detection and mismatches, block weights, fused = hooks, exact restore."""
from __future__ import annotations

import random

import pytest
import torch

import lorakit
from lorakit import apply_loras
from lorakit.errors import IncompatibleLora, InvalidLora, UnsupportedLora, WeightSpecError
from lorakit.lora_model import lora_from_state_dict
from lorakit.prompt import parse_prompt
from tests.factories import KINDS, adapter_tensors, make_kohya_lora, tiny_components
from tests.flux_factories import (H, bfl_lora, bfl_table, kohya_keys, reference_deltas, tiny_flux_components,
                                  xlabs_keys)
from tests.flux_factories import transformer_forward as _forward

STRENGTH = 0.7


@pytest.fixture(scope="module")
def flux() -> dict[str, torch.nn.Module]:
    return tiny_flux_components()


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _expected(flux: dict[str, torch.nn.Module], layers: dict[str, dict[str, torch.Tensor]],
              strength: float = STRENGTH) -> dict[str, torch.Tensor]:
    tr, table = flux["transformer"], bfl_table(2, 3)
    out: dict[str, torch.Tensor] = {}
    for bfl, leaves in layers.items():
        out.update(reference_deltas(tr, bfl, leaves, strength, table))
    return out


def _check_applied(flux: dict[str, torch.nn.Module], before: dict[str, torch.Tensor],
                   expected: dict[str, torch.Tensor]) -> None:
    """Every module the reference changes has W + ΔW_ref (fp32 rounding of the sum apart); every other weight is
    untouched."""
    tr = flux["transformer"]
    for name, p in tr.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in expected:
            want = before[name] + expected[module]
            scale = float(expected[module].abs().max()) + float(before[name].abs().max())
            assert (p.detach() - want).abs().max() <= 2e-6 * scale, name
            assert not torch.equal(p.detach(), before[name]) or float(expected[module].abs().max()) == 0, name
        elif name.endswith(".weight"):
            assert torch.equal(p.detach(), before[name]), f"{name} changed though no layer targets it"


@pytest.mark.parametrize("kind", KINDS)
def test_every_type_on_every_bfl_layer_equals_the_fused_reference(flux: dict[str, torch.nn.Module],
                                                                   kind: str) -> None:
    tr = flux["transformer"]
    layers = bfl_lora(tr, kind, seed=KINDS.index(kind))
    lora = lora_from_state_dict(kohya_keys(layers), {}, name=kind)
    assert lora.arch == "flux1" and lora.leftovers == []
    before, expected = _weights(tr), _expected(flux, layers)
    x = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1))
    with apply_loras(flux, [(lora, STRENGTH)]):
        _check_applied(flux, before, expected)
        fused_out = _forward(tr, x)
    with apply_loras(flux, [(lora, STRENGTH)], mode="hooks"):
        hooks_out = _forward(tr, x)
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())
    assert torch.allclose(fused_out, hooks_out, rtol=1e-4, atol=1e-5)


# -- dialects --------------------------------------------------------------------------------------------------------
def _split_to_diffusers(layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """A BFL plain-LoRA file as the diffusers layout writes it: q, k, v apart, ``down`` shared, rows of ``up``;
    the final adaLN's halves swapped on ``up``."""
    table, out = bfl_table(2, 3), {}
    for bfl, leaves in layers.items():
        parts, swap = table[bfl]
        up = leaves["lora_up.weight"]
        if swap:
            a, b = up.chunk(2)
            up = torch.cat([b, a])
        sizes = [H] * (len(parts) - 1) + [up.shape[0] - H * (len(parts) - 1)] if len(parts) > 1 else [up.shape[0]]
        for part, u in zip(parts, torch.split(up, sizes)):
            out[part] = {**leaves, "lora_up.weight": u.clone()}
    return out


PEFT = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def _dialect(name: str, layers: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor],
                                                                              dict[str, str]]:
    """One file in dialect ``name`` (ROUND3_NOTES §1.2) with the same LoRA as ``layers`` (BFL, plain LoRA)."""
    if name == "F1 kohya":
        return kohya_keys(layers), {}
    if name in ("F2 comfy lora_down", "F3 bfl-peft", "F9 fal kontext", "F8 bare bfl"):
        prefix = {"F9 fal kontext": "base_model.model.", "F8 bare bfl": ""}.get(name, "diffusion_model.")
        rename = PEFT if name != "F2 comfy lora_down" else {}
        return {f"{prefix}{bfl}.{rename.get(leaf, leaf)}": t for bfl, leaves in layers.items()
                for leaf, t in leaves.items() if leaf != "alpha" or not rename}, {}
    split = _split_to_diffusers(layers)
    if name.startswith("F4"):
        prefix = {"F4 diffusers": "transformer.", "F4 base_model": "base_model.model.",
                  "F4 simpletuner": "transformer.base_model.model.", "F4 diffsynth": ""}[name]
        return {f"{prefix}{p}.{PEFT[leaf]}": t for p, leaves in split.items() for leaf, t in leaves.items()
                if leaf != "alpha"}, {}
    prefix = {"F5 onetrainer": "lora_transformer_", "F6 lycoris": "lycoris_"}[name]
    return {f"{prefix}{p.replace('.', '_')}.{leaf}": t for p, leaves in split.items() for leaf, t in leaves.items()}, {}


DIALECTS = ["F1 kohya", "F2 comfy lora_down", "F3 bfl-peft", "F8 bare bfl", "F9 fal kontext", "F4 diffusers",
            "F4 base_model", "F4 simpletuner", "F4 diffsynth", "F5 onetrainer", "F6 lycoris"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialect_gives_the_same_weights(flux: dict[str, torch.nn.Module], dialect: str) -> None:
    tr = flux["transformer"]
    layers = bfl_lora(tr, "lora", seed=3)
    if dialect in ("F3 bfl-peft", "F9 fal kontext", "F8 bare bfl") or dialect.startswith("F4"):  # PEFT: no α → 1
        layers = {b: {k: v for k, v in leaves.items() if k != "alpha"} for b, leaves in layers.items()}
    sd, meta = _dialect(dialect, layers)
    lora = lora_from_state_dict(sd, meta, name=dialect)
    assert lora.arch == "flux1" and lora.leftovers == [], lora.leftovers
    before, expected = _weights(tr), _expected(flux, layers)
    with apply_loras(flux, [(lora, STRENGTH)]):
        _check_applied(flux, before, expected)


def test_peft_alpha_from_adapter_metadata(flux: dict[str, torch.nn.Module]) -> None:
    tr = flux["transformer"]
    layers = bfl_lora(tr, "lora", seed=4)
    sd, _ = _dialect("F4 diffusers", {b: {k: v for k, v in ls.items() if k != "alpha"} for b, ls in layers.items()})
    meta = {"lora_adapter_metadata": '{"transformer.lora_alpha": 2, "transformer.r": 4}'}
    lora = lora_from_state_dict(sd, meta)
    with_alpha = {b: {**ls, "alpha": torch.tensor(2.0)} for b, ls in layers.items()}
    before, expected = _weights(tr), _expected(flux, with_alpha)
    with apply_loras(flux, [(lora, STRENGTH)]):
        _check_applied(flux, before, expected)


def test_onetrainer_bfl_split_names_and_xlabs(flux: dict[str, torch.nn.Module]) -> None:
    """F5b ``…img_attn.qkv.1`` is to_k alone; F7 XLabs ``qkv_lora`` on a single block is linear1's q, k, v rows,
    no α; ``proj_lora1``/``qkv_lora2`` the image proj / text qkv."""
    tr = flux["transformer"]
    t = adapter_tensors("lora", (H, H), 4, torch.Generator().manual_seed(5))
    sd = {f"transformer.double_blocks.1.img_attn.qkv.1.{k}": v for k, v in t.items()}
    sd.update({f"transformer.single_blocks.2.linear1.3.{k}": v for k, v in
               adapter_tensors("lora", (128, H), 4, torch.Generator().manual_seed(6)).items()})
    lora = lora_from_state_dict(sd, {})
    assert sorted(lora.layers) == ["transformer.single_transformer_blocks.2.proj_mlp",
                                   "transformer.transformer_blocks.1.attn.to_k"]
    x = xlabs_keys(torch.Generator().manual_seed(7))
    xl = lora_from_state_dict(x, {})
    assert xl.dialect == "xlabs" and xl.leftovers == []
    up = x["single_blocks.1.processor.qkv_lora.up.weight"]
    before = _weights(tr)
    with apply_loras(flux, [(xl, 1.0)]):
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            name = f"single_transformer_blocks.1.attn.{part}.weight"
            want = before[name] + up[i * H:(i + 1) * H] @ x["single_blocks.1.processor.qkv_lora.down.weight"]
            assert torch.allclose(tr.get_parameter(name), want, atol=1e-5)
        assert torch.equal(tr.get_parameter("single_transformer_blocks.1.proj_mlp.weight"),
                           before["single_transformer_blocks.1.proj_mlp.weight"])  # XLabs leaves the MLP rows
        assert not torch.equal(tr.get_parameter("transformer_blocks.0.attn.add_v_proj.weight"),
                               before["transformer_blocks.0.attn.add_v_proj.weight"])
        assert not torch.equal(tr.get_parameter("transformer_blocks.0.attn.to_out.0.weight"),
                               before["transformer_blocks.0.attn.to_out.0.weight"])


def test_kohya_split_qkv_acts_at_the_loaders_strength(flux: dict[str, torch.nn.Module]) -> None:
    """F1s: a block-diagonal up (3h, 3r) / down (3r, h): every loader (kohya's own) scales by α/(3r) (R3)."""
    tr = flux["transformer"]
    g = torch.Generator().manual_seed(8)
    r, alpha = 2, 4.0
    ups = [torch.randn(H, r, generator=g) for _ in range(3)]
    down = torch.randn(3 * r, H, generator=g)
    up = torch.block_diag(*ups)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
          "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha)}
    before = _weights(tr)
    with apply_loras(flux, [(lora_from_state_dict(sd, {}), 1.0)]):
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            name = f"transformer_blocks.0.attn.{part}.weight"
            want = before[name] + alpha / (3 * r) * ups[i] @ down[i * r:(i + 1) * r]
            assert torch.allclose(tr.get_parameter(name), want, atol=1e-6)


def test_control_lora_bias_and_norm_scales(flux: dict[str, torch.nn.Module]) -> None:
    """F8: ``lora_B.bias`` split with the rows (and swapped on the final layer), q/k norm scales replaced."""
    tr = flux["transformer"]
    g = torch.Generator().manual_seed(9)
    sd = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, H, generator=g),
          "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * H, 4, generator=g),
          "double_blocks.0.img_attn.qkv.lora_B.bias": torch.randn(3 * H, generator=g),
          "final_layer.adaLN_modulation.1.lora_A.weight": torch.randn(4, H, generator=g),
          "final_layer.adaLN_modulation.1.lora_B.weight": torch.randn(2 * H, 4, generator=g),
          "final_layer.adaLN_modulation.1.lora_B.bias": torch.randn(2 * H, generator=g),
          "double_blocks.1.img_attn.norm.query_norm.scale": torch.rand(16, generator=g) + 0.5,
          "single_blocks.0.norm.key_norm.scale": torch.rand(16, generator=g) + 0.5}
    lora = lora_from_state_dict(sd, {})
    assert lora.leftovers == [] and "set" in lora.network_types
    before = _weights(tr)
    bias = sd["double_blocks.0.img_attn.qkv.lora_B.bias"]
    fbias = sd["final_layer.adaLN_modulation.1.lora_B.bias"]
    for m in (0.5, 1.0):
        with apply_loras(flux, [(lora, m)]):
            assert torch.allclose(tr.get_parameter("transformer_blocks.0.attn.to_k.bias"),
                                  before["transformer_blocks.0.attn.to_k.bias"] + m * bias[H:2 * H], atol=1e-6)
            want = before["norm_out.linear.bias"] + m * torch.cat([fbias[H:], fbias[:H]])
            assert torch.allclose(tr.get_parameter("norm_out.linear.bias"), want, atol=1e-6)
            assert torch.equal(tr.get_parameter("transformer_blocks.1.attn.norm_q.weight"),
                               sd["double_blocks.1.img_attn.norm.query_norm.scale"])  # replaced at any strength
            assert torch.equal(tr.get_parameter("single_transformer_blocks.0.attn.norm_k.weight"),
                               sd["single_blocks.0.norm.key_norm.scale"])
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())


def test_full_diff_and_set_weight_keys(flux: dict[str, torch.nn.Module]) -> None:
    """F10: ComfyUI ``.diff``/``.diff_b`` on a fused layer and ``.set_weight``."""
    tr = flux["transformer"]
    g = torch.Generator().manual_seed(10)
    diff, diff_b = torch.randn(7 * H, H, generator=g) * 0.01, torch.randn(7 * H, generator=g) * 0.01
    new = torch.randn(H, 4, generator=g)
    sd = {"diffusion_model.single_blocks.1.linear1.diff": diff, "diffusion_model.single_blocks.1.linear1.diff_b": diff_b,
          "diffusion_model.img_in.set_weight": new}
    before = _weights(tr)
    with apply_loras(flux, [(lora_from_state_dict(sd, {}), 1.0)]):
        mlp = "single_transformer_blocks.1.proj_mlp"
        assert torch.allclose(tr.get_parameter(f"{mlp}.weight"), before[f"{mlp}.weight"] + diff[3 * H:], atol=1e-7)
        assert torch.allclose(tr.get_parameter(f"{mlp}.bias"), before[f"{mlp}.bias"] + diff_b[3 * H:], atol=1e-7)
        assert torch.equal(tr.get_parameter("x_embedder.weight"), new)


# -- text encoders ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,component,path", [
    ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "text_encoder", "encoder.layers.1.self_attn.q_proj"),
    ("lora_te3_encoder_block_1_layer_0_SelfAttention_q", "text_encoder_2", "encoder.block.1.layer.0.SelfAttention.q"),
    ("lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_1", "text_encoder_2", "encoder.block.0.layer.1.DenseReluDense.wi_1"),
    ("text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.o", "text_encoder_2",
     "encoder.block.1.layer.0.SelfAttention.o"),
])
def test_text_encoder_keys(flux: dict[str, torch.nn.Module], prefix: str, component: str, path: str) -> None:
    """CLIP-L ``lora_te1_``; T5 ``lora_te3_`` (kohya) and ``lora_te2_`` (OneTrainer) — T5 either way in a FLUX file
    (R9) — and ComfyUI's ``text_encoders.t5xxl``."""
    module = flux[component].get_submodule(path)
    t = adapter_tensors("lora", tuple(module.weight.shape), 4, torch.Generator().manual_seed(11))
    sd = {f"{prefix}.{k}": v for k, v in t.items()}
    proj = adapter_tensors("lora", (H, H), 4)
    if prefix.startswith("lora_"):
        sd.update(kohya_keys({"double_blocks.0.img_attn.proj": proj}))
    else:  # a ComfyUI file: its transformer keys are ComfyUI's too
        sd.update({f"diffusion_model.double_blocks.0.img_attn.proj.{k}": v for k, v in proj.items()})
    lora = lora_from_state_dict(sd, {})
    assert lora.leftovers == []
    before = module.weight.detach().clone()
    with apply_loras(flux, [(lora, 1.0)]):
        want = before + t["alpha"] / 4 * t["lora_up.weight"] @ t["lora_down.weight"]
        assert torch.allclose(module.weight, want, atol=1e-6)
    with apply_loras(flux, [(lora, {"te": 0.0, "transformer": 1.0})]):
        assert torch.equal(module.weight, before)


# -- family, variant, mismatches -------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys,meta,base", [
    (["lora_unet_double_blocks_0_img_attn_proj"], {}, "flux-1"),
    (["lora_unet_guidance_in_in_layer", "lora_unet_double_blocks_0_img_attn_proj"], {}, "flux-1-dev"),
    (["lora_unet_double_blocks_0_img_attn_proj"], {"modelspec.architecture": "flux-1-schnell/lora"}, "flux-1-schnell"),
    (["lora_unet_double_blocks_0_img_attn_proj"], {"modelspec.architecture": "Flux.1-dev/lora"}, "flux-1-dev"),
])
def test_base_variant(keys: list[str], meta: dict[str, str], base: str) -> None:
    sd = {}
    for k in keys:
        sd.update({f"{k}.{leaf}": v for leaf, v in adapter_tensors("lora", (H, H)).items()})
    lora = lora_from_state_dict(sd, meta)
    assert (lora.arch, lora.base) == ("flux1", base)


def test_flux_lora_on_sd_and_sd_lora_on_flux_refused_before_any_change(flux: dict[str, torch.nn.Module]) -> None:
    sd_model = tiny_components("sdxl")
    flux_lora = lora_from_state_dict(kohya_keys(bfl_lora(flux["transformer"], "lora")), {})
    before = {k: _weights(m) for k, m in sd_model.items()}
    with pytest.raises(IncompatibleLora, match="FLUX.1.*Stable Diffusion XL"):
        apply_loras(sd_model, [(flux_lora, 1.0)])
    assert all(torch.equal(p.detach(), before[k][n]) for k, m in sd_model.items() for n, p in m.named_parameters())
    xl = lora_from_state_dict(make_kohya_lora(sd_model), {})
    assert xl.arch == "sdxl"
    fbefore = _weights(flux["transformer"])
    with pytest.raises(IncompatibleLora, match="Stable Diffusion XL.*FLUX.1"):
        apply_loras(flux, [(flux_lora, 1.0), (xl, 1.0)])
    assert all(torch.equal(p.detach(), fbefore[n]) for n, p in flux["transformer"].named_parameters())


def test_lora_wider_than_the_model_is_refused_naming_the_layer(flux: dict[str, torch.nn.Module]) -> None:
    t = adapter_tensors("lora", (3 * 64, 64))
    sd = {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in t.items()}
    before = _weights(flux["transformer"])
    with pytest.raises(IncompatibleLora, match="transformer_blocks.0.attn.to_q"):
        apply_loras(flux, [(lora_from_state_dict(sd, {}), 1.0)])
    assert all(torch.equal(p.detach(), before[n]) for n, p in flux["transformer"].named_parameters())


@pytest.mark.parametrize("sd,match", [
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, H),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * H + 1, 4)}, "rows, expected 3×32"),
    ({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, H),
      "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(3 * H, 4)}, "leave nothing"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, H),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * H, 4),
      "lora_transformer_transformer_blocks_0_attn_to_k.lora_down.weight": torch.zeros(4, H),
      "lora_transformer_transformer_blocks_0_attn_to_k.lora_up.weight": torch.zeros(H, 4)}, "given twice"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * H, 4)}, "lacks lora_down"),
    ({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.zeros(4, H),
      "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.zeros(2 * H + 1, 4)}, "two swapped halves"),
])
def test_broken_fused_layers_name_file_and_layer(sd: dict[str, torch.Tensor], match: str) -> None:
    with pytest.raises(InvalidLora, match=match) as e:
        lorakit.lora_model.lora_from_state_dict(sd, {}, path="x.safetensors")
    assert str(e.value).startswith("x.safetensors: ")


def test_mixed_dialects_report_the_keys_left_and_strict_refuses() -> None:
    t = adapter_tensors("lora", (3 * H, H))
    sd = {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in t.items()}
    sd.update({"transformer.transformer_blocks.1.attn.to_k.lora_A.weight": torch.zeros(4, H),
               "transformer.transformer_blocks.1.attn.to_k.lora_B.weight": torch.zeros(H, 4)})
    lora = lora_from_state_dict(sd, {}, path="mixed.safetensors")  # read as PEFT: the kohya name is no module
    comps = tiny_flux_components()
    report = apply_loras(comps, [(lora, 1.0)]).reports[0]
    lorakit.restore(comps)
    assert report.unmatched == ["transformer.lora_unet_double_blocks_0_img_attn_qkv"]
    assert "1 layers not in this model, not applied: transformer.lora_unet_double_blocks_0_img_attn_qkv" in report.line()
    with pytest.raises(lorakit.UnmatchedKeys, match="mixed.safetensors: 1 entries not applied"):
        apply_loras(comps, [(lora, 1.0)], strict=True)


def test_families_not_applied_are_named() -> None:  # Chroma is applied now: tests/test_chroma.py
    with pytest.raises(UnsupportedLora, match="FLUX.2"):
        lora_from_state_dict({"diffusion_model.txt_in.lora_A.weight": torch.zeros(4, 15360),
                              "diffusion_model.txt_in.lora_B.weight": torch.zeros(H, 4)}, {})


# -- weights per component and block ---------------------------------------------------------------------------------
def test_block_weights_address_double_and_single_blocks(flux: dict[str, torch.nn.Module]) -> None:
    tr = flux["transformer"]
    lora = lora_from_state_dict(kohya_keys(bfl_lora(tr, "lora")), {})
    before = _weights(tr)

    def changed() -> set[str]:
        return {n.split(".")[0] + ("." + n.split(".")[1] if n[0] in "ts" and n.split(".")[1].isdigit() else "")
                for n, p in tr.named_parameters() if not torch.equal(p.detach(), before[n])}

    with apply_loras(flux, [(lora, {"double": 0.0})]):
        assert not any(c.startswith("transformer_blocks") for c in changed())
        assert {"single_transformer_blocks.0", "x_embedder"} <= changed()
    vector = [0.0] * 58
    vector[1 + 1] = 1.0  # D01
    vector[1 + 19 + 2] = 1.0  # S02
    with apply_loras(flux, [(lora, {"lbw": vector})]):
        assert changed() == {"transformer_blocks.1", "single_transformer_blocks.2"}  # embedders follow BASE (0)
    with pytest.raises(WeightSpecError, match="in/mid/out name a UNet"):
        apply_loras(flux, [(lora, {"in": 0.0})])
    with pytest.raises(WeightSpecError, match="17 or 26 values"):
        apply_loras(flux, [(lora, {"lbw": [1.0] * 5})])
    with pytest.raises(WeightSpecError, match="is for SD1/SD2"):
        apply_loras(flux, [(lora, {"lbw": [1.0] * 17})])
    sd = tiny_components()
    sd_lora = lorakit.lora_from_state_dict({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                                            torch.zeros(2, 32), "lora_unet_down_blocks_0_attentions_0_proj_in."
                                            "lora_up.weight": torch.zeros(32, 2)}, {})
    with pytest.raises(WeightSpecError, match="double/single name FLUX.1"):
        apply_loras(sd, [(sd_lora, {"single": 0.5})])
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())


def test_prompt_names_the_denoiser_and_flux_blocks() -> None:
    ref = parse_prompt("<lora:x:0.8:transformer=0.5:double=0:single=1>").loras[0]
    assert ref.spec() == {"te": 0.8, "unet": 0.5, "double": 0.0, "single": 1.0}


# -- switching and restore -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_apply_switch_restore_cycles_restore_exactly(dtype: torch.dtype) -> None:
    comps = tiny_flux_components(seed=3, dtype=dtype)
    tr = comps["transformer"]
    kinds = ["lora", "lokr", "loha", "dora-in", "full", "ia3"]  # oft, glora: per-type test (slow math)
    loras = [lora_from_state_dict(kohya_keys(bfl_lora(tr, k, seed=i)), {}, name=k) for i, k in enumerate(kinds)]
    before = {k: _weights(m) for k, m in comps.items()}
    rng = random.Random(0)
    cycles = 1000 if dtype == torch.float32 else 200
    for i in range(cycles):
        chosen = rng.sample(loras, rng.randint(1, 3))
        mode = rng.choice(["fused", "fused", "hooks"])
        apply_loras(comps, [(lora, rng.choice([1.0, 0.5, -0.3, {"double": 0.0}])) for lora in chosen], mode=mode)
        if rng.random() < 0.3:
            lorakit.restore(comps)
            assert all(torch.equal(p.detach(), before[k][n]) for k, m in comps.items() for n, p in m.named_parameters())
    lorakit.restore(comps)
    assert all(torch.equal(p.detach(), before[k][n]) for k, m in comps.items() for n, p in m.named_parameters())
