"""SD3 / SD3.5 LoRAs on tiny SD3 transformers (2 joint blocks: the last one has a 2·h swapped context adaLN and no
context output layers; the SD3.5-Medium-like one has qk-norm and ``attn2`` in block 0): every network type on every
SAI layer against an independent fused reference (tests/sd3_factories.py), every dialect, text encoders (CLIP-L,
CLIP-G, T5), sizes and mismatches, fused = hooks, exact restore."""
from __future__ import annotations

import random

import pytest
import torch

import lorakit
from lorakit import apply_loras
from lorakit.errors import IncompatibleLora, InvalidLora
from lorakit.lora_model import lora_from_state_dict
from lorakit.patch.targets import find_module
from tests.factories import KINDS, adapter_tensors
from tests.sd3_factories import (H, kohya_keys, reference_deltas, sai_lora, split_to_diffusers, table_of,
                                 tiny_sd3_components)

STRENGTH = 0.7
PEFT = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


@pytest.fixture(scope="module")
def sd3() -> dict[str, torch.nn.Module]:
    return tiny_sd3_components()


@pytest.fixture(scope="module")
def sd35m() -> dict[str, torch.nn.Module]:
    return tiny_sd3_components(seed=4, medium35=True)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _expected(comps: dict[str, torch.nn.Module], layers: dict[str, dict[str, torch.Tensor]],
              strength: float = STRENGTH) -> dict[str, torch.Tensor]:
    tr = comps["transformer"]
    table, out = table_of(tr), {}
    for sai, leaves in layers.items():
        out.update(reference_deltas(tr, sai, leaves, strength, table))
    return out


def _check_applied(comps: dict[str, torch.nn.Module], before: dict[str, torch.Tensor],
                   expected: dict[str, torch.Tensor]) -> None:
    """Every module the reference changes has W + ΔW_ref (fp32 rounding apart); every other weight is untouched."""
    for name, p in comps["transformer"].named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in expected:
            want = before[name] + expected[module]
            scale = float(expected[module].abs().max()) + float(before[name].abs().max())
            assert (p.detach() - want).abs().max() <= 2e-6 * scale, name
        elif name.endswith(".weight"):
            assert torch.equal(p.detach(), before[name]), f"{name} changed though no layer targets it"


def _forward(tr: torch.nn.Module, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return tr(hidden_states=torch.randn(1, 4, 4, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                  pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0])).sample


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["sd3", "sd35m"])
def test_every_type_on_every_sai_layer_equals_the_fused_reference(kind: str, which: str,
                                                                  request: pytest.FixtureRequest) -> None:
    comps = request.getfixturevalue(which)
    tr = comps["transformer"]
    layers = sai_lora(tr, kind, seed=KINDS.index(kind))
    lora = lora_from_state_dict(kohya_keys(layers), {}, name=kind)
    assert lora.leftovers == [] and lora.arch == ("sd3.5-medium" if which == "sd35m" else "sd3")
    before, expected = _weights(tr), _expected(comps, layers)
    with apply_loras(comps, [(lora, STRENGTH)]):
        _check_applied(comps, before, expected)
        fused = _forward(tr)
    with apply_loras(comps, [(lora, STRENGTH)], mode="hooks"):
        hooks = _forward(tr)
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())
    assert torch.allclose(fused, hooks, rtol=1e-4, atol=1e-5)


def test_the_two_traps_by_hand(sd35m: dict[str, torch.nn.Module]) -> None:
    """The last block's context adaLN (2·h rows, SAI [shift; scale]) lands swapped on ``norm1_context.linear``
    ([scale; shift]); block 0's (6·h) lands as it is; ``x_block.attn2.qkv`` is attn2's q, k, v."""
    tr = sd35m["transformer"]
    g = torch.Generator().manual_seed(3)
    up_last, up_0, up_a2, down = (torch.randn(2 * H, 2, generator=g), torch.randn(6 * H, 2, generator=g),
                                  torch.randn(3 * H, 2, generator=g), torch.randn(2, H, generator=g))
    sd = {"lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight": up_last,
          "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight": up_0,
          "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight": up_a2}
    sd.update({k.replace("lora_up", "lora_down"): down for k in list(sd)})
    before = _weights(tr)
    with apply_loras(sd35m, [(lora_from_state_dict(sd, {}), 1.0)]):
        name = "transformer_blocks.1.norm1_context.linear.weight"
        want = before[name] + torch.cat([up_last[H:], up_last[:H]]) @ down
        assert torch.allclose(tr.get_parameter(name), want, atol=1e-6)
        name = "transformer_blocks.0.norm1_context.linear.weight"
        assert torch.allclose(tr.get_parameter(name), before[name] + up_0 @ down, atol=1e-6)
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            name = f"transformer_blocks.0.attn2.{part}.weight"
            assert torch.allclose(tr.get_parameter(name), before[name] + up_a2[i * H:(i + 1) * H] @ down, atol=1e-6)


# -- dialects (ROUND3_NOTES §2.2) -------------------------------------------------------------------------------------
def _dialect(name: str, tr: torch.nn.Module, layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One file in dialect ``name`` with the same LoRA as ``layers`` (SAI layout, plain LoRA, no α for PEFT)."""
    if name == "kohya":
        return kohya_keys(layers)
    if name == "comfyui":
        return {f"diffusion_model.{m}.{PEFT.get(leaf, leaf)}": t for m, leaves in layers.items()
                for leaf, t in leaves.items()}
    split = split_to_diffusers(tr, layers)
    if name in ("diffusers", "peft-raw", "simpletuner"):
        prefix = {"diffusers": "transformer.", "peft-raw": "base_model.model.",
                  "simpletuner": "transformer.base_model.model."}[name]
        return {f"{prefix}{p}.{PEFT[leaf]}": t for p, leaves in split.items() for leaf, t in leaves.items()
                if leaf != "alpha"}
    prefix = {"onetrainer": "lora_transformer_", "lycoris": "lycoris_"}[name]
    return {f"{prefix}{p.replace('.', '_')}.{leaf}": t for p, leaves in split.items() for leaf, t in leaves.items()}


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "peft-raw", "simpletuner", "onetrainer",
                                     "lycoris"])
def test_every_dialect_gives_the_same_weights(sd35m: dict[str, torch.nn.Module], dialect: str) -> None:
    tr = sd35m["transformer"]
    layers = sai_lora(tr, "lora", seed=3)
    if dialect in ("diffusers", "peft-raw", "simpletuner"):  # PEFT without lora_adapter_metadata: α = r
        layers = {m: {k: v for k, v in leaves.items() if k != "alpha"} for m, leaves in layers.items()}
    lora = lora_from_state_dict(_dialect(dialect, tr, layers), {}, name=dialect)
    assert lora.leftovers == [] and lora.arch == "sd3.5-medium", lora.leftovers
    before, expected = _weights(tr), _expected(sd35m, layers)
    with apply_loras(sd35m, [(lora, STRENGTH)]):
        _check_applied(sd35m, before, expected)


def test_kohya_split_qkv_acts_at_the_loaders_strength(sd3: dict[str, torch.nn.Module]) -> None:
    """kohya ``split_qkv`` saves the combined form: block-diagonal up (3h, 3r), down (3r, h), scaled α/(3r) (R3)."""
    tr = sd3["transformer"]
    g = torch.Generator().manual_seed(8)
    r, alpha = 2, 4.0
    ups = [torch.randn(H, r, generator=g) for _ in range(3)]
    down = torch.randn(3 * r, H, generator=g)
    sd = {"lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight": torch.block_diag(*ups),
          "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight": down,
          "lora_unet_joint_blocks_1_context_block_attn_qkv.alpha": torch.tensor(alpha)}
    before = _weights(tr)
    with apply_loras(sd3, [(lora_from_state_dict(sd, {}), 1.0)]):
        for i, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            name = f"transformer_blocks.1.attn.{part}.weight"
            want = before[name] + alpha / (3 * r) * ups[i] @ down[i * r:(i + 1) * r]
            assert torch.allclose(tr.get_parameter(name), want, atol=1e-6)


# -- text encoders ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,component,path", [
    ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "text_encoder", "encoder.layers.1.self_attn.q_proj"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2", "encoder.layers.0.mlp.fc1"),
    ("lora_te3_encoder_block_1_layer_0_SelfAttention_k", "text_encoder_3", "encoder.block.1.layer.0.SelfAttention.k"),
    ("lora_te1_text_projection", "text_encoder", "text_projection"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj", "text_encoder_2",
     "encoder.layers.1.self_attn.v_proj"),
    ("text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_1", "text_encoder_3",
     "encoder.block.0.layer.1.DenseReluDense.wi_1"),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj", "text_encoder_2",
     "encoder.layers.0.self_attn.out_proj"),
])
def test_text_encoder_keys(sd3: dict[str, torch.nn.Module], key: str, component: str, path: str) -> None:
    """In an SD3 file ``lora_te2_`` is CLIP-G and ``lora_te3_`` T5 (R9); ComfyUI's clip_g / t5xxl; diffusers'
    text_encoder_2."""
    module = find_module(sd3, f"{component}.{path}")
    assert module is not None
    t = adapter_tensors("lora", tuple(module.weight.shape), 4, torch.Generator().manual_seed(11))
    proj = adapter_tensors("lora", (H, H), 4)
    if key.startswith("lora_"):
        sd = {f"{key}.{k}": v for k, v in t.items()}
        sd.update(kohya_keys({"joint_blocks.0.x_block.attn.proj": proj}))
    else:
        peft = key.startswith("text_encoder_")
        rename = PEFT if peft else {}
        sd = {f"{key}.{rename.get(k, k)}": v for k, v in t.items() if not peft or k != "alpha"}
        sd.update({f"diffusion_model.joint_blocks.0.x_block.attn.proj.{PEFT[k]}": v for k, v in proj.items()
                   if k in PEFT})
    lora = lora_from_state_dict(sd, {})
    assert lora.leftovers == [] and lora.arch == "sd3"
    before = module.weight.detach().clone()
    scale = float(t["alpha"]) / 4 if "alpha" in t and not key.startswith("text_encoder_") else 1.0
    with apply_loras(sd3, [(lora, 1.0)]):
        want = before + scale * t["lora_up.weight"] @ t["lora_down.weight"]
        assert torch.allclose(module.weight, want, atol=1e-6)
    with apply_loras(sd3, [(lora, {"te": 0.0, "transformer": 1.0})]):
        assert torch.equal(module.weight, before)


# -- sizes and mismatches --------------------------------------------------------------------------------------------
def test_a_lora_for_another_size_is_refused_before_any_change(sd3: dict[str, torch.nn.Module],
                                                              sd35m: dict[str, torch.nn.Module]) -> None:
    """An SD3.5-Medium LoRA (attn2 keys) on the SD3-Medium-like model; an SD3-Medium one (metadata) on the 3.5
    one: refused, naming both, nothing changed."""
    m35 = lora_from_state_dict(kohya_keys(sai_lora(sd35m["transformer"], "lora")), {}, name="m35")
    m3 = lora_from_state_dict(kohya_keys(sai_lora(sd3["transformer"], "lora")),
                              {"modelspec.architecture": "stable-diffusion-3-medium/lora"}, name="m3")
    assert (m35.arch, m3.arch) == ("sd3.5-medium", "sd3-medium")
    for comps, lora, match in ((sd3, m35, "for Stable Diffusion 3.5 Medium, the model is Stable Diffusion 3 Medium"),
                               (sd35m, m3, "for Stable Diffusion 3 Medium, the model is Stable Diffusion 3.5 Medium")):
        before = _weights(comps["transformer"])
        with pytest.raises(IncompatibleLora, match=match):
            apply_loras(comps, [(lora, 1.0)])
        assert all(torch.equal(p.detach(), before[n]) for n, p in comps["transformer"].named_parameters())


@pytest.mark.parametrize("sd,match", [
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, H),
      "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * H + 1, 4)}, "rows, expected 3×32"),
    ({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.zeros(4, H),
      "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.zeros(2 * H + 1, 4)}, "two swapped halves"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, H),
      "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * H, 4),
      "lora_transformer_transformer_blocks_0_attn_to_k.lora_down.weight": torch.zeros(4, H),
      "lora_transformer_transformer_blocks_0_attn_to_k.lora_up.weight": torch.zeros(H, 4)}, "given twice"),
    ({"lora_unet_joint_blocks_0_context_block_attn_qkv.lora_up.weight": torch.zeros(3 * H, 4)}, "lacks lora_down"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.full((4, H), float("nan")),
      "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * H, 4)}, "NaN or inf"),
    ({"lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.oft_blocks": torch.zeros(2, 3, 3)},
     "hidden width is unknown"),
])
def test_broken_files_name_file_and_layer(sd: dict[str, torch.Tensor], match: str) -> None:
    with pytest.raises(InvalidLora, match=match) as e:
        lora_from_state_dict(sd, {}, path="x.safetensors")
    assert str(e.value).startswith("x.safetensors: ")


def test_a_wider_lora_is_refused_naming_the_layer(sd3: dict[str, torch.nn.Module]) -> None:
    t = adapter_tensors("lora", (3 * 64, 64))
    sd = {f"lora_unet_joint_blocks_0_x_block_attn_qkv.{k}": v for k, v in t.items()}
    with pytest.raises(IncompatibleLora, match="transformer_blocks.0.attn.to_q"):
        apply_loras(sd3, [(lora_from_state_dict(sd, {}), 1.0)])


# -- switching and restore -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_apply_switch_restore_cycles_restore_exactly(dtype: torch.dtype) -> None:
    comps = tiny_sd3_components(seed=3, dtype=dtype, medium35=True)
    tr = comps["transformer"]
    kinds = ["lora", "lokr", "loha", "dora-in", "full", "ia3"]
    loras = [lora_from_state_dict(kohya_keys(sai_lora(tr, k, seed=i)), {}, name=k) for i, k in enumerate(kinds)]
    before = {k: _weights(m) for k, m in comps.items()}
    rng = random.Random(0)
    cycles = 1000 if dtype == torch.float32 else 200
    for _ in range(cycles):
        chosen = rng.sample(loras, rng.randint(1, 3))
        mode = rng.choice(["fused", "fused", "hooks"])
        apply_loras(comps, [(lora, rng.choice([1.0, 0.5, -0.3, {"te": 0.0}])) for lora in chosen], mode=mode)
        if rng.random() < 0.3:
            lorakit.restore(comps)
            assert all(torch.equal(p.detach(), before[k][n]) for k, m in comps.items() for n, p in m.named_parameters())
    lorakit.restore(comps)
    assert all(torch.equal(p.detach(), before[k][n]) for k, m in comps.items() for n, p in m.named_parameters())
