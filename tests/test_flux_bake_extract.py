"""bake into and extract from FLUX.1 models on the tiny FLUX.1: a diffusers folder, a BFL transformer-only file and
a ComfyUI all-in-one checkpoint; baked weights are bit for bit what ``apply_loras`` fuses (every type, fused layers
whose change reads the whole fused weight included); an extracted LoRA is in BFL names, each fused layer one LoRA,
and applies within the error its report states."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import ToolError
from lorakit.files.io import load_file, save_file
from lorakit.tools.bake import bake
from lorakit.tools.extract import ExtractOptions, extract
from lorakit.tools.svd import RankRule
from tests.flux_factories import H, bfl_lora, bfl_state, kohya_keys, tiny_flux_pipeline, wide_qkv_lora
from tests.test_flux_convert import _mixed

NAMES = ("transformer", "text_encoder", "text_encoder_2")


def _comps(pipe: object) -> dict[str, torch.nn.Module]:
    return {n: getattr(pipe, n) for n in NAMES}


def _all_in_one(pipe: object) -> dict[str, torch.Tensor]:
    sd = {f"model.diffusion_model.{k}": v for k, v in bfl_state(pipe.transformer).items()}  # type: ignore[attr-defined]
    for name, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "t5xxl")):
        sd.update({f"text_encoders.{prefix}.transformer.{k}": v.clone()
                   for k, v in getattr(pipe, name).state_dict().items()})
    return sd


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    d = tmp_path_factory.mktemp("fluxbake")
    pipe = tiny_flux_pipeline()
    tr = pipe.transformer  # type: ignore[attr-defined]
    lyco = kohya_keys(bfl_lora(tr, _mixed, seed=2))
    g = torch.Generator().manual_seed(3)
    for te in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
               "lora_te3_encoder_block_1_layer_0_SelfAttention_o"):
        lyco.update({f"{te}.lora_down.weight": torch.randn(2, 32, generator=g),
                     f"{te}.lora_up.weight": torch.randn(32, 2, generator=g)})
    save_file(lyco, d / "mixed.safetensors")
    save_file(kohya_keys(bfl_lora(tr, "lora", seed=4)), d / "lora.safetensors")
    pipe.save_pretrained(d / "model32")  # type: ignore[attr-defined]
    pipe.to(torch.bfloat16)  # type: ignore[attr-defined]
    pipe.save_pretrained(d / "model")  # type: ignore[attr-defined]
    save_file(bfl_state(tr), d / "flux1-tiny.safetensors")
    save_file(_all_in_one(pipe), d / "aio.safetensors")
    return pipe, d


SPECS = ["mixed.safetensors:0.8", "lora.safetensors:te=0:unet=-0.6"]


def test_bake_folder_bfl_file_and_all_in_one_equal_apply_bitwise(base: tuple[object, Path]) -> None:
    pipe, d = base
    specs = [str(d / s) for s in SPECS]
    with lorakit.apply_loras(_comps(pipe), [(d / "mixed.safetensors", 0.8),
                                            (d / "lora.safetensors", {"te": 0, "unet": -0.6})]):
        want = {f"{c}.{n}": p.detach().clone() for c, m in _comps(pipe).items() for n, p in m.named_parameters()}
        want_bfl = bfl_state(pipe.transformer)  # type: ignore[attr-defined]
        want_aio = _all_in_one(pipe)
    report = bake(d / "model", specs, d / "baked")
    assert report.left_out == [] and report.layers
    got = {}
    for c in NAMES:
        for f in (d / "baked" / c).glob("*.safetensors"):
            got.update({f"{c}.{k}": v for k, v in load_file(f)[0].items()})
    assert got.keys() >= want.keys()
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert bad == []
    assert not torch.equal(want["text_encoder_2.encoder.block.1.layer.0.SelfAttention.o.weight"],
                           load_file(d / "model" / "text_encoder_2" / "model.safetensors")[0][
                               "encoder.block.1.layer.0.SelfAttention.o.weight"])
    for name, expected in (("flux1-tiny", want_bfl), ("aio", want_aio)):
        bake(d / f"{name}.safetensors", specs, d / f"{name}-baked.safetensors")
        out = load_file(d / f"{name}-baked.safetensors")[0]
        assert out.keys() == expected.keys()
        assert [k for k in out if not torch.equal(out[k], expected[k])] == []


def test_bake_refuses_a_lora_of_another_width(base: tuple[object, Path], tmp_path: Path) -> None:
    _, d = base
    save_file(wide_qkv_lora(), tmp_path / "wide.safetensors")
    with pytest.raises(lorakit.LorakitError, match="to_q"):
        bake(d / "model", [str(tmp_path / "wide.safetensors")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _transformer(folder: Path) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()


def test_extract_is_bfl_fused_and_applies_within_the_reported_error(base: tuple[object, Path],
                                                                    tmp_path: Path) -> None:
    """fp32 models: the tuned one is the base with a LoRA baked in; the BFL single file is that model too."""
    _, d = base
    bake(d / "model32", [f"{d / 'lora.safetensors'}:1"], tmp_path / "tuned")
    tuned = _transformer(tmp_path / "tuned")
    save_file(bfl_state(tuned), tmp_path / "tuned-bfl.safetensors")
    tr = _transformer(d / "model32")
    before = {n: p.detach().double().clone() for n, p in tr.named_parameters()}
    want = {n: p.detach().double() - before[n] for n, p in tuned.named_parameters()}
    weights = [n for n in want if want[n].dim() == 2]
    for src, rule in (("tuned", RankRule("rank", 4)), ("tuned-bfl.safetensors", RankRule("rank", 2)),
                      ("tuned", RankRule("sv_fro", 0.9))):
        out = tmp_path / "x.safetensors"
        report = extract(d / "model32", tmp_path / src, out, ExtractOptions(rule, components=("transformer",)))
        sd = load_file(out)[0]
        assert not any(k.startswith("lora_transformer_") for k in sd)
        assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 7 * H  # one fused LoRA
        assert "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight" in sd
        with lorakit.apply_loras({"transformer": tr}, [(out, 1.0)]):
            got = {n: p.detach().double() - before[n] for n, p in tr.named_parameters()}
        err = math.sqrt(sum(float((got[n] - want[n]).pow(2).sum()) for n in weights))
        norm = math.sqrt(sum(float(want[n].pow(2).sum()) for n in weights))
        stated = report.per_component()["transformer"]
        assert abs(err / norm - stated) < 1e-4 + 1e-3 * stated, (rule, err / norm, stated)
        if rule.value == 4:
            assert stated < 1e-5  # rank 4 holds the rank-4 LoRA baked in
        else:
            assert stated > 0.01


def test_extract_refuses_models_of_different_families(base: tuple[object, Path], tmp_path: Path) -> None:
    from tests.factories import tiny_sd1_pipeline

    _, d = base
    tiny_sd1_pipeline().save_pretrained(tmp_path / "sd")  # type: ignore[attr-defined]
    with pytest.raises(ToolError, match="extract needs a model and its base"):
        extract(d / "model32", tmp_path / "sd", tmp_path / "x.safetensors")


def test_bad_flux_model_files_are_named(base: tuple[object, Path], tmp_path: Path) -> None:
    from lorakit.tools.modelfile import open_model

    pipe, d = base
    state = bfl_state(pipe.transformer)  # type: ignore[attr-defined]
    cases = {"odd": ({**state, "double_blocks.0.img_attn.extra.weight": torch.zeros(2, 2)},
                     "double_blocks.0.img_attn.extra.weight is not a FLUX.1 transformer tensor"),
             "noimg": ({k: v for k, v in state.items() if not k.startswith("img_in.")}, "without img_in.weight"),
             "rows": ({**state, "single_blocks.0.linear1.weight": torch.zeros(3 * H, H)},
                      r"single_blocks.0.linear1.weight cannot be split.*96 rows leave nothing for")}
    for name, (sd, message) in cases.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(ToolError, match=message):
            open_model(tmp_path / f"{name}.safetensors")
        with pytest.raises(ToolError, match=message):
            bake(tmp_path / f"{name}.safetensors", [str(d / "lora.safetensors")], tmp_path / f"{name}-out.safetensors")
        assert not (tmp_path / f"{name}-out.safetensors").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ToolError, match="has no transformer/"):
        open_model(tmp_path / "empty")
