"""Qwen-Image LoRAs on a tiny QwenImageTransformer2DModel (2 blocks, h=48): every network type on every layer
exact against the independent reference (tests/qwen_factories.py), the dialects of ROUND3_NOTES §3 (diffusers,
``diffusion_model.``, kohya/musubi ``lora_unet_``, OneTrainer's hybrid, PEFT ``.default.``, LyCORIS, LoKr),
detection, mismatches, broken files, exact restore."""
from __future__ import annotations

import random

import pytest
import torch

import lorakit
from lorakit import apply_loras
from lorakit.errors import IncompatibleLora, InvalidLora, UnsupportedLora, WeightSpecError
from lorakit.lora_model import lora_from_state_dict
from tests.factories import KINDS, adapter_tensors
from tests.flux_factories import tiny_flux_components
from tests.qwen_factories import H, kohya_name, qwen_lora, qwen_table, reference_delta, tiny_qwen_transformer

STRENGTH = 0.7


@pytest.fixture(scope="module")
def qwen() -> dict[str, torch.nn.Module]:
    return {"transformer": tiny_qwen_transformer()}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _expected(tr: torch.nn.Module, layers: dict[str, dict[str, torch.Tensor]],
              strength: float = STRENGTH) -> dict[str, torch.Tensor]:
    return {m: reference_delta(tr.get_submodule(m).weight, leaves, strength) for m, leaves in layers.items()}


def _check(tr: torch.nn.Module, before: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, p in tr.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in expected:
            want = before[name] + expected[module]
            scale = float(expected[module].abs().max()) + float(before[name].abs().max())
            assert (p.detach() - want).abs().max() <= 2e-6 * scale, name
            assert not torch.equal(p.detach(), before[name]), name
        elif name.endswith(".weight"):
            assert torch.equal(p.detach(), before[name]), f"{name} changed though no layer targets it"


def _kohya(layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{kohya_name(m)}.{leaf}": t for m, leaves in layers.items() for leaf, t in leaves.items()}


def _forward(tr: torch.nn.Module) -> torch.Tensor:
    """One forward of a 4×4-latent picture (2×2 tokens after packing) with 3 text tokens."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return tr(hidden_states=torch.randn(1, 4, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                  encoder_hidden_states_mask=torch.ones(1, 3), timestep=torch.tensor([0.5]),
                  img_shapes=[(1, 2, 2)]).sample


@pytest.mark.parametrize("kind", KINDS)
def test_every_type_on_every_layer_equals_the_reference(qwen: dict[str, torch.nn.Module], kind: str) -> None:
    tr = qwen["transformer"]
    layers = qwen_lora(tr, kind, seed=KINDS.index(kind))
    lora = lora_from_state_dict(_kohya(layers), {}, name=kind)
    assert (lora.arch, lora.leftovers) == ("qwen-image", [])
    before, expected = _weights(tr), _expected(tr, layers)
    with apply_loras(qwen, [(lora, STRENGTH)]) as applied:
        assert applied.reports[0].unmatched == []
        _check(tr, before, expected)
        fused = _forward(tr) if kind in ("lora", "lokr", "dora-in") else None
    if fused is not None:
        with apply_loras(qwen, [(lora, STRENGTH)], mode="hooks"):
            assert torch.allclose(_forward(tr), fused, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())


PEFT = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def _dialect(name: str, layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One file in dialect ``name`` (ROUND3_NOTES §3) with the LoRA of ``layers`` (module → kohya leaves)."""
    if name == "kohya/musubi":
        return _kohya(layers)
    if name == "lycoris":
        return {f"lycoris_{m.replace('.', '_')}.{leaf}": t for m, ls in layers.items() for leaf, t in ls.items()}
    if name.startswith("onetrainer"):  # diffusers names, kohya leaves and α
        prefix = "transformer." if name == "onetrainer transformer." else ""
        return {f"{prefix}{m}.{leaf}": t for m, ls in layers.items() for leaf, t in ls.items()}
    prefix, default = {"diffusers": ("transformer.", ""), "comfy": ("diffusion_model.", ""),
                       "peft default": ("", "default."), "peft base_model": ("base_model.model.", "")}[name]
    return {f"{prefix}{m}.{PEFT[leaf].replace('.', '.' + default)}": t for m, ls in layers.items()
            for leaf, t in ls.items() if leaf != "alpha"}


DIALECTS = ["diffusers", "comfy", "kohya/musubi", "onetrainer", "onetrainer transformer.", "peft default",
            "peft base_model", "lycoris"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialect_gives_the_same_weights(qwen: dict[str, torch.nn.Module], dialect: str) -> None:
    tr = qwen["transformer"]
    layers = qwen_lora(tr, "lora", seed=3)
    if dialect in ("diffusers", "comfy") or dialect.startswith("peft"):  # PEFT: no α → α = rank
        layers = {m: {k: v for k, v in ls.items() if k != "alpha"} for m, ls in layers.items()}
    lora = lora_from_state_dict(_dialect(dialect, layers), {}, name=dialect)
    assert (lora.arch, lora.leftovers) == ("qwen-image", [])
    assert sorted(lora.layers) == sorted(f"transformer.{m}" for m in qwen_table())
    before, expected = _weights(tr), _expected(tr, layers)
    with apply_loras(qwen, [(lora, STRENGTH)]):
        _check(tr, before, expected)


def test_lokr_as_trainers_write_it(qwen: dict[str, torch.nn.Module]) -> None:
    """A LyCORIS LoKr of the kohya dialect (``lokr_w1`` full, ``lokr_w2_a``/``_b`` low-rank, α) on the attention."""
    tr = qwen["transformer"]
    g = torch.Generator().manual_seed(4)
    leaves = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": torch.randn(H // 4, 2, generator=g) * 0.1,
              "lokr_w2_b": torch.randn(2, H // 4, generator=g) * 0.1, "alpha": torch.tensor(1.0)}
    sd = {f"lora_unet_transformer_blocks_1_attn_to_q.{k}": v for k, v in leaves.items()}
    before = _weights(tr)
    lora = lora_from_state_dict(sd, {})
    assert (lora.arch, lora.network_types) == ("qwen-image", ["lokr"])
    with apply_loras(qwen, [(lora, 1.0)]):
        w2 = leaves["lokr_w2_a"] @ leaves["lokr_w2_b"]
        want = before["transformer_blocks.1.attn.to_q.weight"] + 0.5 * torch.kron(leaves["lokr_w1"], w2)
        assert torch.allclose(tr.get_parameter("transformer_blocks.1.attn.to_q.weight"), want, atol=1e-6)


@pytest.mark.parametrize("keys,meta,found", [
    (["transformer.transformer_blocks.0.img_mlp.net.2"], {}, "qwen-image"),
    (["lora_unet_transformer_blocks_3_txt_mod_1"], {}, "qwen-image"),
    (["transformer.transformer_blocks.45.attn.to_q"], {}, "qwen-image"),  # past SD3.5-L's 38 blocks
    (["transformer.transformer_blocks.0.attn.to_q"], {"modelspec.architecture": "qwen-image/lora"}, "qwen-image"),
    (["transformer.transformer_blocks.0.attn.to_q"], {"ss_base_model_version": "qwen_image"}, "qwen-image"),
    (["transformer.transformer_blocks.0.attn.to_q"], {}, "flux1"),  # keys that fit FLUX.1 too, no metadata
    (["lora_unet_transformer_blocks_0_attn_to_q"], {}, "qwen-image"),  # musubi's names; kohya's FLUX.1: BFL
    (["lora_unet_transformer_blocks_0_attn_to_q"], {"ss_base_model_version": "flux1"}, "flux1"),
])
def test_detection(keys: list[str], meta: dict[str, str], found: str) -> None:
    sd = {f"{k}.{leaf}": v for k in keys for leaf, v in adapter_tensors("lora", (H, H)).items()}
    assert lora_from_state_dict(sd, meta).arch == found


def test_qwen_lora_on_flux_and_flux_lora_on_qwen_refused_before_any_change(qwen: dict[str, torch.nn.Module]) -> None:
    from tests.flux_factories import bfl_lora, kohya_keys

    flux = tiny_flux_components()
    q = lora_from_state_dict(_kohya(qwen_lora(qwen["transformer"], "lora")), {}, path="q.safetensors")
    f = lora_from_state_dict(kohya_keys(bfl_lora(flux["transformer"], "lora")), {}, path="f.safetensors")
    before_f, before_q = _weights(flux["transformer"]), _weights(qwen["transformer"])
    with pytest.raises(IncompatibleLora, match="q.safetensors: this LoRA is for Qwen-Image, the model is FLUX.1"):
        apply_loras(flux, [(q, 1.0)])
    with pytest.raises(IncompatibleLora, match="f.safetensors: this LoRA is for FLUX.1, the model is Qwen-Image"):
        apply_loras(qwen, [(f, 1.0)])
    assert all(torch.equal(p.detach(), before_f[n]) for n, p in flux["transformer"].named_parameters())
    assert all(torch.equal(p.detach(), before_q[n]) for n, p in qwen["transformer"].named_parameters())


def test_full_size_lora_on_the_tiny_model_names_the_layer(qwen: dict[str, torch.nn.Module]) -> None:
    sd = {f"transformer.transformer_blocks.0.attn.to_q.{k}": v
          for k, v in (("lora_A.weight", torch.zeros(4, 3072)), ("lora_B.weight", torch.zeros(3072, 4)))}
    sd.update({"transformer.transformer_blocks.0.img_mod.1.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.img_mod.1.lora_B.weight": torch.zeros(6 * 3072, 4)})
    before = _weights(qwen["transformer"])
    with pytest.raises(IncompatibleLora, match="big.safetensors: 2 layers do not fit the model \\(Qwen-Image\\): "
                                               "transformer.transformer_blocks.0.attn.to_q"):
        apply_loras(qwen, [(lora_from_state_dict(sd, {}, path="big.safetensors"), 1.0)])
    assert all(torch.equal(p.detach(), before[n]) for n, p in qwen["transformer"].named_parameters())


@pytest.mark.parametrize("sd,error,match", [
    ({"lora_unet_transformer_blocks_0_img_mod_1.lora_up.weight": torch.zeros(6 * H, 4)}, InvalidLora,
     "lacks lora_down"),
    ({"lora_unet_transformer_blocks_0_img_mod_1.lora_down.weight": torch.zeros(4, H),
      "lora_unet_transformer_blocks_0_img_mod_1.lora_up.weight": torch.full((6 * H, 4), float("nan"))}, InvalidLora,
     "NaN"),
    ({"lora_unet_transformer_blocks_0_img_mod_1.lora_down.weight": torch.zeros(4, H),
      "lora_unet_transformer_blocks_0_img_mod_1.lora_up.weight": torch.zeros(6 * H, 5)}, InvalidLora, "rank|4|5"),
])
def test_broken_files_name_file_and_layer(sd: dict[str, torch.Tensor], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as e:
        lora_from_state_dict(sd, {}, path="bad.safetensors")
    assert str(e.value).startswith("bad.safetensors: ")


def test_layers_not_in_the_model_are_reported_and_strict_refuses(qwen: dict[str, torch.nn.Module]) -> None:
    """A 60-block file on the 2-block model: the blocks past its depth are named, not applied; strict refuses."""
    layers = qwen_lora(qwen["transformer"], "lora", modules=["transformer_blocks.1.attn.to_k"])
    sd = _kohya(layers)
    sd.update({k.replace("blocks_1_", "blocks_59_"): v for k, v in sd.items()})
    lora = lora_from_state_dict(sd, {}, path="deep.safetensors")
    with apply_loras(qwen, [(lora, 1.0)]) as applied:
        assert applied.reports[0].unmatched == ["transformer.transformer_blocks.59.attn.to_k"]
    with pytest.raises(lorakit.UnmatchedKeys, match="deep.safetensors: 1 entries not applied"):
        apply_loras(qwen, [(lora, 1.0)], strict=True)


def test_block_weights_name_the_double_blocks_only(qwen: dict[str, torch.nn.Module]) -> None:
    tr = qwen["transformer"]
    lora = lora_from_state_dict(_kohya(qwen_lora(tr, "lora")), {})
    before = _weights(tr)
    with apply_loras(qwen, [(lora, {"double": 0.0})]):
        changed = {n for n, p in tr.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed and not any(n.startswith("transformer_blocks") for n in changed)
    with pytest.raises(WeightSpecError, match="Qwen-Image has double ones only"):
        apply_loras(qwen, [(lora, {"single": 0.5})])
    with pytest.raises(WeightSpecError, match="58-value block-weight vector is for FLUX.1"):
        apply_loras(qwen, [(lora, {"lbw": [1.0] * 58})])


def test_other_dits_still_named() -> None:
    with pytest.raises(UnsupportedLora, match="Wan"):
        lora_from_state_dict({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 16),
                              "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(16, 4)}, {})


def test_random_apply_switch_restore_cycles_restore_exactly() -> None:
    comps = {"transformer": tiny_qwen_transformer(seed=3)}
    tr = comps["transformer"]
    loras = [lora_from_state_dict(_kohya(qwen_lora(tr, k, seed=i)), {}, name=k)
             for i, k in enumerate(["lora", "lokr", "loha", "dora-in", "full", "ia3"])]
    before = _weights(tr)
    rng = random.Random(0)
    for _ in range(1000):
        chosen = rng.sample(loras, rng.randint(1, 3))
        apply_loras(comps, [(lora, rng.choice([1.0, 0.5, -0.3, {"double": 0.0}])) for lora in chosen],
                    mode=rng.choice(["fused", "fused", "hooks"]))
        if rng.random() < 0.3:
            lorakit.restore(comps)
            assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())
    lorakit.restore(comps)
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())
