"""Chroma: FLUX.1 LoRAs on a tiny ChromaTransformer2DModel (2 double, 3 single blocks, h=32) — every network type
exact against the independent fused reference (tests/chroma_factories.py) on the layers Chroma has, the layers it
pruned reported by name and refused under strict; Chroma-trained files (``distilled_guidance_layer``) exact;
detection, mismatches, broken files, exact restore."""
from __future__ import annotations

import random

import pytest
import torch

import lorakit
from lorakit import apply_loras
from lorakit.errors import IncompatibleLora, InvalidLora, UnmatchedKeys
from lorakit.lora_model import lora_from_state_dict
from tests.chroma_factories import DOUBLE, SINGLE, chroma_lora, chroma_table, tiny_chroma_transformer
from tests.factories import KINDS, adapter_tensors
from tests.flux_factories import H, bfl_lora, bfl_table, kohya_keys, reference_deltas, tiny_flux_components

STRENGTH = 0.7


@pytest.fixture(scope="module")
def chroma() -> dict[str, torch.nn.Module]:
    return {"transformer": tiny_chroma_transformer()}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _pruned() -> set[str]:
    """The diffusers modules of a FLUX.1 model whose BFL layers Chroma does not have."""
    table = chroma_table()
    return {f"transformer.{p}" for b, (parts, _) in bfl_table(DOUBLE, SINGLE).items() if b not in table
            for p in parts}


def _expected(tr: torch.nn.Module, layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers module → ΔW_ref of the layers Chroma has (computed on the weights before any change)."""
    table, expected = chroma_table(), {}
    for bfl, leaves in layers.items():
        if bfl in table:
            expected.update(reference_deltas(tr, bfl, leaves, STRENGTH, table))
    assert expected
    return expected


def _check(tr: torch.nn.Module, before: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every module of a Chroma layer has W + ΔW_ref; every other weight is untouched."""
    for name, p in tr.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in expected:
            want = before[name] + expected[module]
            scale = float(expected[module].abs().max()) + float(before[name].abs().max())
            assert (p.detach() - want).abs().max() <= 2e-6 * scale, name
        elif name.endswith(".weight"):  # biases: the full type's diff_b (tests/test_flux.py checks them)
            assert torch.equal(p.detach(), before[name]), f"{name} changed though no layer targets it"


def _forward(tr: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.zeros(4, 3)
    ids[:, 1], ids[:, 2] = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        return tr(hidden_states=torch.randn(1, 4, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(3, 3)).sample


@pytest.mark.parametrize("kind", KINDS)
def test_flux_lora_of_every_type_applies_exactly_and_reports_what_chroma_pruned(
        chroma: dict[str, torch.nn.Module], kind: str) -> None:
    tr = chroma["transformer"]
    layers = bfl_lora(_flux_shapes(), kind, seed=KINDS.index(kind))
    lora = lora_from_state_dict(kohya_keys(layers), {}, path=f"{kind}.safetensors")
    assert lora.arch == "flux1" and lora.leftovers == []
    before, expected = _weights(tr), _expected(tr, layers)
    with apply_loras(chroma, [(lora, STRENGTH)]) as applied:
        report = applied.reports[0]
        _check(tr, before, expected)
        fused = _forward(tr) if kind in ("lora", "lokr", "dora-in") else None
    assert set(report.unmatched) == _pruned()
    assert "not in this model, not applied: " in report.line() and "norm1_context.linear" in report.line()
    if fused is not None:
        with apply_loras(chroma, [(lora, STRENGTH)], mode="hooks"):
            assert torch.allclose(_forward(tr), fused, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())


_FLUX: list[torch.nn.Module] = []


def _flux_shapes() -> torch.nn.Module:
    """One tiny FLUX.1 transformer for the fused shapes of its BFL layers (built once)."""
    if not _FLUX:
        _FLUX.append(tiny_flux_components()["transformer"])
    return _FLUX[0]


def test_strict_refuses_a_flux_lora_with_pruned_layers_before_any_change(chroma: dict[str, torch.nn.Module]) -> None:
    tr = chroma["transformer"]
    lora = lora_from_state_dict(kohya_keys(bfl_lora(_flux_shapes(), "lora")), {}, path="f.safetensors")
    before = _weights(tr)
    with pytest.raises(UnmatchedKeys, match=r"f.safetensors: 14 entries not applied \(strict mode\)"):
        apply_loras(chroma, [(lora, 1.0)], strict=True)
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.named_parameters())
    only_blocks = {b: ls for b, ls in bfl_lora(_flux_shapes(), "lora").items() if b in chroma_table()}
    with apply_loras(chroma, [(lora_from_state_dict(kohya_keys(only_blocks), {}), 1.0)], strict=True) as applied:
        assert applied.reports[0].unmatched == []


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha", "dora-in", "full", "oft"])
def test_chroma_trained_files_apply_exactly(chroma: dict[str, torch.nn.Module], kind: str) -> None:
    """kohya names of Chroma's own layers: BFL blocks and ``distilled_guidance_layer`` (``in_layer``/``out_layer``
    are the model's ``linear_1``/``linear_2``)."""
    tr = chroma["transformer"]
    layers = chroma_lora(tr, kind, seed=3)
    lora = lora_from_state_dict(kohya_keys(layers), {}, name=kind)
    assert (lora.arch, lora.leftovers) == ("chroma", [])
    before, expected = _weights(tr), _expected(tr, layers)
    with apply_loras(chroma, [(lora, STRENGTH)]) as applied:
        assert applied.reports[0].unmatched == []
        _check(tr, before, expected)


def test_comfy_and_diffusers_names_of_the_approximator(chroma: dict[str, torch.nn.Module]) -> None:
    tr = chroma["transformer"]
    t = adapter_tensors("lora", tuple(tr.get_submodule("distilled_guidance_layer.layers.1.linear_2").weight.shape))
    peft = {"lora_A.weight": t["lora_down.weight"], "lora_B.weight": t["lora_up.weight"]}
    comfy = lora_from_state_dict({f"diffusion_model.distilled_guidance_layer.layers.1.out_layer.{k}": v
                                  for k, v in peft.items()}, {})
    diffusers = lora_from_state_dict({f"transformer.distilled_guidance_layer.layers.1.linear_2.{k}": v
                                      for k, v in peft.items()}, {"modelspec.architecture": "chroma/lora"})
    assert comfy.arch == diffusers.arch == "chroma"
    assert list(comfy.layers) == list(diffusers.layers) == ["transformer.distilled_guidance_layer.layers.1.linear_2"]
    module = tr.get_submodule("distilled_guidance_layer.layers.1.linear_2")
    before = module.weight.detach().clone()
    for lora in (comfy, diffusers):
        with apply_loras(chroma, [(lora, 1.0)]):
            assert torch.allclose(module.weight, before + t["lora_up.weight"] @ t["lora_down.weight"], atol=1e-6)


@pytest.mark.parametrize("meta,arch", [({"ss_base_model_version": "chroma"}, "chroma"),
                                       ({"modelspec.architecture": "chroma/lora"}, "chroma"),
                                       ({}, "flux1"), ({"ss_base_model_version": "flux1"}, "flux1")])
def test_flux_names_are_flux_unless_metadata_says_chroma(meta: dict[str, str], arch: str) -> None:
    sd = kohya_keys({"double_blocks.0.img_attn.proj": adapter_tensors("lora", (H, H))})
    assert lora_from_state_dict(sd, meta).arch == arch


def test_chroma_lora_on_flux_and_flux_model_mismatch_refused(chroma: dict[str, torch.nn.Module]) -> None:
    own = lora_from_state_dict(kohya_keys(chroma_lora(chroma["transformer"], "lora")), {}, path="c.safetensors")
    flux = tiny_flux_components()
    before = _weights(flux["transformer"])
    with pytest.raises(IncompatibleLora, match="c.safetensors: this LoRA is for Chroma, the model is FLUX.1"):
        apply_loras(flux, [(own, 1.0)])
    assert all(torch.equal(p.detach(), before[n]) for n, p in flux["transformer"].named_parameters())


@pytest.mark.parametrize("sd,error,match", [
    ({"lora_unet_distilled_guidance_layer_in_proj.lora_down.weight": torch.zeros(4, 2 * H),
      "lora_unet_distilled_guidance_layer_in_proj.lora_up.weight": torch.zeros(32, 4)}, IncompatibleLora,
     "distilled_guidance_layer.in_proj"),
    ({"lora_unet_distilled_guidance_layer_out_proj.lora_up.weight": torch.zeros(H, 4)}, InvalidLora, "lacks lora_down"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, H),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * H + 1, 4)}, InvalidLora,
     "rows, expected 3×32"),
])
def test_broken_files_name_file_and_layer(chroma: dict[str, torch.nn.Module], sd: dict[str, torch.Tensor],
                                          error: type[Exception], match: str) -> None:
    before = _weights(chroma["transformer"])
    with pytest.raises(error, match=match) as e:
        lora = lora_from_state_dict(sd, {"ss_base_model_version": "chroma"}, path="bad.safetensors")
        apply_loras(chroma, [(lora, 1.0)])
    assert "bad.safetensors" in str(e.value)
    assert all(torch.equal(p.detach(), before[n]) for n, p in chroma["transformer"].named_parameters())


def test_random_apply_switch_restore_cycles_restore_exactly() -> None:
    comps = {"transformer": tiny_chroma_transformer(seed=3)}
    tr = comps["transformer"]
    loras = [lora_from_state_dict(kohya_keys(chroma_lora(tr, k, seed=i)), {}, name=k)
             for i, k in enumerate(["lora", "lokr", "loha", "dora-in", "full", "ia3"])]
    loras.append(lora_from_state_dict(kohya_keys(bfl_lora(_flux_shapes(), "lora", seed=9)), {}, name="flux"))
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


def test_flux_t5_layers_land_on_chromas_t5_and_clip_layers_are_reported() -> None:
    """FLUX.1's T5 is its ``text_encoder_2`` (kohya ``lora_te3_``), Chroma's is its ``text_encoder``; FLUX.1's CLIP-L
    layers (``lora_te1_``) have no module on Chroma (no CLIP)."""
    from tests.flux_factories import tiny_t5

    comps = {"transformer": tiny_chroma_transformer(), "text_encoder": tiny_t5()}
    t5 = comps["text_encoder"].get_submodule("encoder.block.1.layer.0.SelfAttention.q")
    t = adapter_tensors("lora", tuple(t5.weight.shape), 4, torch.Generator().manual_seed(11))
    clip = adapter_tensors("lora", (32, 32), 4)
    sd = {f"lora_te3_encoder_block_1_layer_0_SelfAttention_q.{k}": v for k, v in t.items()}
    sd |= {f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in clip.items()}
    sd |= kohya_keys({"double_blocks.0.img_attn.proj": adapter_tensors("lora", (H, H))})
    lora = lora_from_state_dict(sd, {})
    assert lora.arch == "flux1"
    before = t5.weight.detach().clone()
    with apply_loras(comps, [(lora, 1.0)]) as applied:
        want = before + t["alpha"] / 4 * t["lora_up.weight"] @ t["lora_down.weight"]
        assert torch.allclose(t5.weight, want, atol=1e-6)
        assert applied.reports[0].unmatched == ["text_encoder.encoder.layers.0.self_attn.q_proj"]
        assert applied.reports[0].patched == {"text_encoder": 1, "transformer": 1}
    assert torch.equal(t5.weight, before)


def test_report_lists_every_layer_not_applied_with_block_indices_folded() -> None:
    from lorakit.patch.plan import compact_paths

    paths = [f"transformer.transformer_blocks.{i}.norm1.linear" for i in (0, 1, 2, 5, 7, 8)]
    paths += ["transformer.norm_out.linear", "transformer.single_transformer_blocks.3.norm.linear"]
    assert compact_paths(paths) == ("transformer.transformer_blocks.{0-2,5,7-8}.norm1.linear, transformer.norm_out."
                                    "linear, transformer.single_transformer_blocks.{3}.norm.linear")
