"""``convert`` on FLUX.1 files: kohya (BFL names), ComfyUI BFL-PEFT and diffusers/PEFT, round trips bit for bit where
the layout carries the data, the parts of fused layers fused back exactly (one down, or kohya's block-diagonal
``split_qkv``), and what a layout cannot hold refused by name or dropped and listed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import ToolError
from lorakit.files.io import load_file, save_file
from lorakit.tools.convert import ConvertOptions, convert
from tests.factories import adapter_tensors, make_kohya_lora, tiny_components
from tests.flux_factories import H, bfl_lora, kohya_keys, tiny_flux_components, tiny_flux_pipeline, xlabs_keys

TARGETS = ("kohya", "comfy", "peft")


@pytest.fixture(scope="module")
def flux() -> dict[str, torch.nn.Module]:
    return tiny_flux_components()


def _mixed(bfl: str) -> str:
    """Every network type somewhere, on fused and plain BFL layers."""
    if "qkv" in bfl:
        return "lora" if bfl.startswith("double_blocks.0") else "lokr"
    if "linear1" in bfl:
        return "dora-in" if bfl.startswith("single_blocks.0") else "lora"
    return {"img_mlp.0": "loha", "txt_mlp.2": "full", "modulation.lin": "dora-out"}.get(bfl.split(".", 2)[-1], "lora")


def _control(g: torch.Generator) -> dict[str, torch.Tensor]:
    """BFL control LoRA extras in kohya names: ``lora_up.bias`` on fused layers, q/k norm ``set_weight``, ``diff``."""
    return {"lora_unet_double_blocks_1_img_attn_qkv.lora_up.bias": torch.randn(3 * H, generator=g),
            "lora_unet_final_layer_adaLN_modulation_1.lora_up.bias": torch.randn(2 * H, generator=g),
            "lora_unet_double_blocks_1_img_attn_norm_query_norm.set_weight": torch.rand(16, generator=g) + 0.5,
            "lora_unet_single_blocks_2_linear1.diff": torch.randn(7 * H, H, generator=g) * 0.01,
            "lora_unet_single_blocks_2_linear1.diff_b": torch.randn(7 * H, generator=g) * 0.01}


@pytest.fixture(scope="module")
def files(flux: dict[str, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fluxconv")
    tr = flux["transformer"]
    g = torch.Generator().manual_seed(3)
    layers = bfl_lora(tr, "lora", seed=1)
    lora = kohya_keys({b: ls for b, ls in layers.items() if not b.startswith("single_blocks.2.l")})
    lora.update(_control(g))
    te = make_kohya_lora({"text_encoder": flux["text_encoder"]}, "lora", rank=2, seed=5)
    lora.update({k.replace("lora_te_", "lora_te1_"): v for k, v in te.items()})
    lora.update({f"lora_te3_encoder_block_0_layer_0_SelfAttention_q.{k}": v
                 for k, v in adapter_tensors("lora", (32, 32), 2, g).items()})
    out = {"lora": d / "lora.safetensors", "mixed": d / "mixed.safetensors", "dora": d / "dora.safetensors"}
    save_file(lora, out["lora"], {"ss_base_model_version": "flux1"})
    save_file(kohya_keys(bfl_lora(tr, _mixed, seed=2)), out["mixed"])
    save_file(kohya_keys(bfl_lora(tr, "dora-out", seed=4)), out["dora"])
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["lora", "mixed", "dora"])
@pytest.mark.parametrize("via", ["kohya", "comfy"])
def test_kohya_round_trips_bit_for_bit(files: dict[str, Path], tmp_path: Path, name: str, via: str) -> None:
    """Every type, BFL names, ``lora_up.bias``, ``set_weight``, ``diff``, CLIP-L and T5 come back as they were."""
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    report = convert(files[name], mid, ConvertOptions(via))
    convert(mid, back, ConvertOptions("kohya"))
    assert _same(_tensors(back), _tensors(files[name]))
    assert report.notes == [] and report.left_out == []
    if via == "comfy":
        keys = set(_tensors(mid))
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys or name == "mixed"
        assert "diffusion_model.final_layer.adaLN_modulation.1.alpha" in keys
        assert not any(k.startswith("lora_") for k in keys)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_kohya_peft_kohya_bit_for_bit(files: dict[str, Path], tmp_path: Path, name: str) -> None:
    """Through the diffusers layout: fused LoRAs split (shared down, rows of up and of the bias, final layer swapped
    on up only) and fused back to the same tensors; ``set_weight``/``diff`` have no PEFT form (dropped, listed)."""
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    if name == "lora":
        with pytest.raises(ToolError, match=r"single_blocks\.2\.linear1: a full change of the fused.*\(and 1 more\)"):
            convert(files[name], mid, ConvertOptions("peft"))
    report = convert(files[name], mid, ConvertOptions("peft", drop_unsupported=True))
    sd = _tensors(mid)
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in sd
    assert not any(k.startswith(("lora_", "diffusion_model.")) for k in sd)
    convert(mid, back, ConvertOptions("kohya"))
    want = _tensors(files[name])
    dropped = {k for k in want if "norm_query_norm" in k or ".diff" in k}
    assert {w for w, _ in report.left_out} == ({"transformer.transformer_blocks.1.attn.norm_q",
                                                "transformer.single_blocks.2.linear1"} if name == "lora" else set())
    assert _same(_tensors(back), {k: v for k, v in want.items() if k not in dropped})
    if name == "lora":
        meta = json.loads(load_file(mid)[1]["lora_adapter_metadata"])
        assert meta["transformer.lora_bias"] is True
        assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in sd  # T5: no text_model
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in sd


def test_types_peft_cannot_hold_are_named(flux: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    src = tmp_path / "mixed.safetensors"  # no per-output DoRA beside plain LoRAs: PEFT has one use_dora per component
    save_file(kohya_keys(bfl_lora(flux["transformer"], lambda b: "lora" if "modulation" in b else _mixed(b))), src)
    with pytest.raises(ToolError, match=r"double_blocks\.1\.img_attn\.qkv: a lokr change of the fused layer"):
        convert(src, tmp_path / "x.safetensors", ConvertOptions("diffusers"))
    report = convert(src, tmp_path / "x.safetensors", ConvertOptions("diffusers", drop_unsupported=True))
    left = dict(report.left_out)
    assert "per-input DoRA" in left["transformer.single_blocks.0.linear1"]
    assert "lokr" in left["transformer.double_blocks.1.txt_attn.qkv"]
    assert "LoRA/LoCon layers only" in left["transformer.transformer_blocks.0.ff.net.0.proj"]  # a LoHa
    lora = lorakit.load_lora(tmp_path / "x.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_q" in lora.layers  # the LoRA qkv of block 0 is kept
    assert not any(p.startswith("transformer.single_transformer_blocks.0.attn") for p in lora.layers)
    sd = make_kohya_lora(tiny_components("sd1"), "lora", seed=1)
    save_file(sd, tmp_path / "sd.safetensors")
    with pytest.raises(ToolError, match="--to comfy writes FLUX.1 LoRAs"):
        convert(tmp_path / "sd.safetensors", tmp_path / "y.safetensors", ConvertOptions("comfy"))


def _diffusers_file(tr: torch.nn.Module, path: Path, skip: tuple[str, ...] = (),
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT FLUX.1 LoRA trained per module: every Linear its own down (q, k, v apart), α 8 at r 4."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in tr.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith(skip):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.1
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.1
    save_file(sd, path, {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})})
    return sd


def _applied(flux: dict[str, torch.nn.Module], path: Path) -> dict[str, torch.Tensor]:
    with lorakit.apply_loras(flux, [(path, 0.9)]):
        return {n: p.detach().clone() for n, p in flux["transformer"].named_parameters()}


def test_diffusers_parts_fuse_block_diagonally_and_come_back(flux: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    """Separately trained q/k/v fuse as kohya's split_qkv (block-diagonal up, α = s·Σr: every loader's α/r of the
    file is the parts' scale); back in the diffusers layout each part is compact again: the input, bit for bit."""
    src, kohya, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors", tmp_path / "b.safetensors"
    sd = _diffusers_file(flux["transformer"], src)
    report = convert(src, kohya, ConvertOptions("kohya"))
    k = _tensors(kohya)
    assert report.notes == [] and not any(key.startswith("lora_transformer_") for key in k)
    up = k["lora_unet_single_blocks_1_linear1.lora_up.weight"]
    assert up.shape == (7 * H, 16) and float(k["lora_unet_single_blocks_1_linear1.alpha"]) == 32
    assert torch.equal(up[3 * H:, 12:], sd["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"])
    assert not up[:H, 4:].any()
    final = k["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]  # BFL [shift; scale] = swapped halves
    assert torch.equal(final, torch.cat(sd["transformer.norm_out.linear.lora_B.weight"].chunk(2)[::-1]))
    convert(kohya, back, ConvertOptions("peft"))
    assert _same(_tensors(back), sd)
    before = _applied(flux, src)
    for path in (kohya, back):
        for name, p in _applied(flux, path).items():
            assert torch.allclose(p, before[name], rtol=0, atol=1e-6), name


def test_parts_that_do_not_fuse_keep_diffusers_names(flux: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    src, kohya, comfy = tmp_path / "d.safetensors", tmp_path / "k.safetensors", tmp_path / "c.safetensors"
    _diffusers_file(flux["transformer"], src, skip=("single_transformer_blocks.0.proj_mlp", "0.attn.add_v_proj"))
    report = convert(src, kohya, ConvertOptions("kohya"))
    assert report.notes == [
        "transformer.double_blocks.0.txt_attn.qkv: written as its parts (add_q_proj, add_k_proj) under diffusers "
        "names: no add_v_proj here (a fused layer needs every part)",
        "transformer.single_blocks.0.linear1: written as its parts (to_q, to_k, to_v) under diffusers names: no "
        "proj_mlp here (a fused layer needs every part)"]
    k = _tensors(kohya)
    assert "lora_transformer_single_transformer_blocks_0_attn_to_k.lora_down.weight" in k
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in k
    convert(src, comfy, ConvertOptions("comfy"))
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in _tensors(comfy)
    before = _applied(flux, src)
    for path in (kohya, comfy):
        for name, p in _applied(flux, path).items():
            assert torch.allclose(p, before[name], rtol=0, atol=1e-6), name


def test_xlabs_and_onetrainer_inputs(flux: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    """XLabs' single-block ``qkv_lora`` (linear1's q, k, v rows only): ComfyUI's ``linear1_qkv`` in comfy files,
    the three parts in kohya files (kohya names have no partial layer). OneTrainer per-input DoRA on q/k/v parts
    normalises each part alone: no fused form, kept as parts."""
    g = torch.Generator().manual_seed(7)
    x = xlabs_keys(g)
    src = tmp_path / "x.safetensors"
    save_file(x, src)
    out = {t: tmp_path / f"{t}.safetensors" for t in TARGETS}
    reports = {t: convert(src, p, ConvertOptions(t)) for t, p in out.items()}
    k, c = _tensors(out["kohya"]), _tensors(out["comfy"])
    assert torch.equal(k["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"],
                       x["double_blocks.0.processor.qkv_lora2.up.weight"])
    assert "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight" in k
    assert "lora_transformer_single_transformer_blocks_1_attn_to_v.lora_up.weight" in k
    assert "proj_mlp" in reports["kohya"].notes[0]
    assert torch.equal(c["diffusion_model.single_blocks.1.linear1_qkv.lora_B.weight"],
                       x["single_blocks.1.processor.qkv_lora.up.weight"])
    before = _applied(flux, src)
    for path in out.values():
        assert all(torch.equal(p, before[n]) for n, p in _applied(flux, path).items())
    ot = {f"lora_transformer_transformer_blocks_1_attn_to_{p}.{leaf}": t for p in "qkv" for leaf, t in
          adapter_tensors("dora-in", (H, H), 4, g).items()}
    save_file(ot, tmp_path / "ot.safetensors")
    report = convert(tmp_path / "ot.safetensors", tmp_path / "otk.safetensors", ConvertOptions("kohya"))
    assert "per input" in report.notes[0] and _same(_tensors(tmp_path / "otk.safetensors"), ot)


def test_diffusers_loads_the_peft_file(flux: dict[str, torch.nn.Module], files: dict[str, Path],
                                       tmp_path: Path) -> None:
    """diffusers' own loader (FluxPipeline.load_lora_weights, fused at 0.9) gives what lorakit applies: α/r from the
    header, the final layer's rows, the biases of a control LoRA (PEFT's lora_bias)."""
    out = tmp_path / "p.safetensors"
    convert(files["lora"], out, ConvertOptions("diffusers", drop_unsupported=True))
    pipe = tiny_flux_pipeline()
    tr = pipe.transformer  # type: ignore[attr-defined]
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    with lorakit.apply_loras({"transformer": tr}, [(out, 0.9)]):
        want = {n: p.detach().clone() for n, p in tr.named_parameters()}
    pipe.load_lora_weights(str(out))  # type: ignore[attr-defined]
    pipe.fuse_lora(lora_scale=0.9, components=["transformer"])  # type: ignore[attr-defined]
    got = {n.replace(".base_layer", ""): p.detach() for n, p in tr.named_parameters() if "lora_" not in n}
    changed = [n for n in want if not torch.equal(want[n], before[n])]
    assert any(n.endswith("to_k.bias") for n in changed) and "norm_out.linear.weight" in changed
    for n in changed:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6), n


def test_cli_on_flux_files(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    out = tmp_path / "c.safetensors"
    assert main(["convert", str(files["mixed"]), "-o", str(out), "--to", "comfy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] > 0
    assert main(["inspect", str(out)]) == 0
    assert "flux" in capsys.readouterr().out.lower()
    assert main(["convert", str(files["mixed"]), "-o", str(tmp_path / "p.safetensors"), "--to", "peft"]) == 2
    err = capsys.readouterr().err
    assert "transformer.double_blocks.1.img_attn.qkv" in err and "--drop-unsupported" in err
    assert not (tmp_path / "p.safetensors").exists()
    assert main(["resize", str(out), "-o", str(tmp_path / "r.safetensors"), "--sv-fro", "0.9"]) == 0
    assert "transformer" in capsys.readouterr().out


def test_onetrainer_bfl_parts_and_t5_prefix(flux: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    """OneTrainer's BFL names (``qkv.0``/``.1``/``.2``: one part each, own downs, same α/r) fuse block-diagonally;
    its T5 ``lora_te2_`` comes out as kohya's ``lora_te3_``."""
    g = torch.Generator().manual_seed(8)
    sd = {f"transformer.double_blocks.1.txt_attn.qkv.{i}.{k}": v for i in range(3)
          for k, v in adapter_tensors("lora", (H, H), 2, g).items()}
    save_file(sd, tmp_path / "ot.safetensors")
    report = convert(tmp_path / "ot.safetensors", tmp_path / "k.safetensors", ConvertOptions("kohya"))
    k = _tensors(tmp_path / "k.safetensors")
    leaves = ("alpha", "lora_down.weight", "lora_up.weight")
    assert report.notes == [] and sorted(k) == [f"lora_unet_double_blocks_1_txt_attn_qkv.{leaf}" for leaf in leaves]
    assert k["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"].shape == (3 * H, 6)
    assert torch.equal(k["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"][2:4],
                       sd["transformer.double_blocks.1.txt_attn.qkv.1.lora_down.weight"])
    before = _applied(flux, tmp_path / "ot.safetensors")
    for n, p in _applied(flux, tmp_path / "k.safetensors").items():
        assert torch.allclose(p, before[n], rtol=0, atol=1e-6), n
    t5 = {f"lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_0.{k}": v
          for k, v in adapter_tensors("lora", (37, 32), 2, g).items()}
    t5.update({f"lora_transformer_single_transformer_blocks_0_norm_linear.{k}": v
               for k, v in adapter_tensors("lora", (3 * H, H), 2, g).items()})
    save_file(t5, tmp_path / "ot2.safetensors")
    convert(tmp_path / "ot2.safetensors", tmp_path / "k2.safetensors", ConvertOptions("kohya"))
    assert sorted(_tensors(tmp_path / "k2.safetensors")) == sorted(
        [f"lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.{leaf}" for leaf in leaves]
        + [f"lora_unet_single_blocks_0_modulation_lin.{leaf}" for leaf in leaves])
