"""bake, extract and convert against real readers: baked weights equal ``apply_loras`` bit for bit (folder and single
file, fp16), extraction recovers a LoRA and drops nothing silently, converted files load in diffusers, PEFT and
LyCORIS with the right scale and convert back to the same tensors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import ToolError
from lorakit.files.io import load_file, save_file
from lorakit.formats.writers import kohya_module_name
from lorakit.keymap.arch import Arch
from lorakit.tools.bake import BakeOptions, bake
from lorakit.tools.checkpoint import to_checkpoint
from lorakit.tools.convert import ConvertOptions, canonical_groups, convert
from lorakit.tools.extract import ExtractOptions, extract
from lorakit.tools.svd import RankRule

from .factories import make_kohya_lora, tiny_sd2_pipeline, tiny_sdxl_pipeline
from .tools_helpers import delta, lyco_file, rel

NAMES = ("unet", "text_encoder", "text_encoder_2")


def _components(pipe: object) -> dict[str, torch.nn.Module]:
    return {k: getattr(pipe, k) for k in NAMES if getattr(pipe, k, None) is not None}


def _mixed(path: str) -> str:
    return "dora-out" if "attn1" in path else "loha" if "conv" in path else "full" if "ff" in path else "lora"


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    d = tmp_path_factory.mktemp("xl")
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(d / "fp32")  # type: ignore[attr-defined]
    pipe.to(torch.float16).save_pretrained(d / "fp16")  # type: ignore[attr-defined]
    comps = _components(pipe)
    save_file(make_kohya_lora(comps, _mixed, rank=4, seed=1), d / "mixed.safetensors")
    save_file(make_kohya_lora(comps, "lora", rank=4, seed=2, alpha=3.0), d / "lora.safetensors")
    return pipe.to(torch.float32), d  # type: ignore[attr-defined]


def _apply_in(comps: dict[str, torch.nn.Module], loras: list[tuple[Path, object]]) -> dict[str, torch.Tensor]:
    with lorakit.apply_loras(comps, loras):
        return {f"{c}.{n}": p.detach().clone() for c, m in comps.items() for n, p in m.named_parameters()}


def test_bake_folder_equals_fused_apply_bitwise(xl: tuple[object, Path]) -> None:
    _, d = xl
    specs = [(d / "mixed.safetensors", 0.7, "0.7"),
             (d / "lora.safetensors", {"te": 0.5, "unet": 1.0, "lbw": "1,0,1,0,1,0,1,0,1,0,1,0"},
              "te=0.5:unet=1:lbw=1,0,1,0,1,0,1,0,1,0,1,0")]
    report = bake(d / "fp16", [f"{p}:{t}" for p, _, t in specs], d / "baked")
    ref = _components(tiny_sdxl_pipeline().to(torch.float16))  # type: ignore[attr-defined]  # = the fp16 folder
    want = _apply_in(ref, [(p, s) for p, s, _ in specs])
    for c in ref:
        got, _ = load_file(next((d / "baked" / c).glob("*.safetensors")))
        assert {f"{c}.{k}" for k in got} == {k for k in want if k.startswith(f"{c}.")}
        for k, t in got.items():
            assert t.dtype == torch.float16 and torch.equal(t, want[f"{c}.{k}"]), f"{c}.{k}"
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (d / "baked" / vae).read_bytes() == (d / "fp16" / vae).read_bytes()  # untouched files copied
    assert len(report.layers) > 100 and not list(d.glob(".baked*"))


@pytest.mark.parametrize("arch", [Arch.SD2, Arch.SDXL])
def test_bake_single_file_equals_fused_apply_bitwise(arch: str, tmp_path: Path) -> None:
    """OpenCLIP text encoders keep q/k/v fused in one tensor: each projection is patched and put back."""
    pipe = (tiny_sdxl_pipeline() if arch == Arch.SDXL else tiny_sd2_pipeline()).to(torch.float16)  # type: ignore[attr-defined]
    save_file(to_checkpoint(pipe, arch), tmp_path / "m.safetensors")
    comps = _components(pipe)
    save_file(make_kohya_lora(comps, _mixed, rank=4, seed=1), tmp_path / "a.safetensors")
    configs = {k: (m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)) for k, m in comps.items()}
    bake(tmp_path / "m.safetensors", [f"{tmp_path / 'a.safetensors'}:0.7"], tmp_path / "b.safetensors",
         BakeOptions(configs=configs))
    with lorakit.apply_loras(comps, [(tmp_path / "a.safetensors", 0.7)]):
        want = to_checkpoint(pipe, arch)
    got, meta = load_file(tmp_path / "b.safetensors")
    assert set(got) == set(want) and json.loads(meta["lorakit.sources"])[0]["weight"] == "0.7"
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_extract_recovers_the_lora_and_drops_nothing(xl: tuple[object, Path]) -> None:
    pipe, d = xl
    comps = _components(pipe)
    bake(d / "fp32", [f"{d / 'lora.safetensors'}:te=0.3:unet=1"], d / "tuned")
    out = d / "x.safetensors"
    report = extract(d / "fp32", d / "tuned", out, ExtractOptions(RankRule("rank", 4)))
    src, got = lorakit.load_lora(d / "lora.safetensors"), lorakit.load_lora(out)
    assert set(got.layers) == set(src.layers) and not report.left_out
    for path in src.layers:
        s = 0.3 if path.startswith("text_encoder") else 1.0
        assert rel(delta(got, path, comps), delta(src, path, comps, s)) <= 1e-4, path
    small = extract(d / "fp32", d / "tuned", None, ExtractOptions(RankRule("rank", 4), min_diff=1.0, dry_run=True))
    assert {p.split(".")[0] for p, _ in small.left_out} >= {"text_encoder", "text_encoder_2"}  # reported, not lost


def test_extract_reports_what_a_lora_cannot_hold(xl: tuple[object, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Biases changed by a full-diff LoRA are listed; the weights are read tensor by tensor, never whole files."""
    _, d = xl
    bake(d / "fp32", [f"{d / 'mixed.safetensors'}:1"], d / "tuned_mixed")
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("whole-file load"))
    report = extract(d / "fp32", d / "tuned_mixed", None, ExtractOptions(RankRule("rank", 2), dry_run=True))
    assert any(p.endswith(".bias") and "bias" in why for p, why in report.left_out)
    assert report.per_component()["unet"] > 0  # LoHa/DoRA changes are not rank 2: the cost is reported


def test_converted_files_round_trip_and_load_in_diffusers(xl: tuple[object, Path]) -> None:
    pipe, d = xl
    src = d / "lora.safetensors"
    original = canonical_groups(lorakit.load_lora(src))
    want = _apply_in(_components(pipe), [(src, 0.8)])
    before = {f"{c}.{n}": p.detach().clone() for c, m in _components(pipe).items() for n, p in m.named_parameters()}
    for target in ("peft", "diffusers"):
        convert(src, d / f"{target}.safetensors", ConvertOptions(target))
        convert(d / f"{target}.safetensors", d / f"{target}_back.safetensors", ConvertOptions("kohya"))
        back = canonical_groups(lorakit.load_lora(d / f"{target}_back.safetensors"))
        assert set(back) == set(original)
        for path, leaves in original.items():
            assert set(back[path]) == set(leaves)
            assert all(torch.equal(back[path][k].float(), v.float()) for k, v in leaves.items()), path
        pipe.load_lora_weights(str(d / f"{target}.safetensors"), adapter_name=target)  # type: ignore[attr-defined]
        pipe.fuse_lora(lora_scale=0.8, adapter_names=[target])  # type: ignore[attr-defined]
        for c, m in _components(pipe).items():
            for n, p in m.named_parameters():
                key = f"{c}.{n.replace('.base_layer', '')}"
                if "lora_" not in n and key in want and not torch.equal(want[key], before[key]):
                    assert rel(p.detach() - before[key], want[key] - before[key]) < 1e-5, key
        pipe.unfuse_lora()  # type: ignore[attr-defined]
        pipe.unload_lora_weights()  # type: ignore[attr-defined]


def test_peft_output_loads_with_peft_and_other_types_are_refused(xl: tuple[object, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    pipe, d = xl
    out = tmp_path / "p.safetensors"
    convert(d / "lora.safetensors", out, ConvertOptions("peft"))
    sd, meta = load_file(out)
    cfg = json.loads(meta["lora_adapter_metadata"])
    unet_cfg = {k[len("unet."):]: v for k, v in cfg.items() if k.startswith("unet.")}
    assert unet_cfg["lora_alpha"] == 3.0 and unet_cfg["r"] == 4
    unet = tiny_sdxl_pipeline().unet  # type: ignore[attr-defined]
    inject_adapter_in_model(LoraConfig(**unet_cfg), unet)
    result = set_peft_model_state_dict(unet, {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")})
    assert not result.unexpected_keys
    loha = tmp_path / "loha.safetensors"
    save_file(make_kohya_lora(_components(pipe), lambda p: "loha" if "conv" in p else "lora", seed=4), loha)
    with pytest.raises(ToolError, match="LoRA/LoCon layers only"):
        convert(loha, tmp_path / "m.safetensors", ConvertOptions("peft"))
    report = convert(loha, tmp_path / "m.safetensors", ConvertOptions("peft", drop_unsupported=True))
    assert report.left_out and all(".conv" in p and "only" in why for p, why in report.left_out)
    with pytest.raises(ToolError, match="DoRA and some are not"):  # PEFT's use_dora is one flag per model
        convert(d / "mixed.safetensors", tmp_path / "m.safetensors", ConvertOptions("peft", drop_unsupported=True))


def test_kohya_outputs_load_in_lycoris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # The reader first builds a default network, which trips over this diffusers' UNet (duplicate names); the
    # modules that matter come from the file, so build the default one empty.
    for attr in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                 "TEXT_ENCODER_TARGET_REPLACE_NAME"):
        monkeypatch.setattr(LycorisNetworkKohya, attr, [])

    from .factories import tiny_components

    comps = tiny_components("sd1", seed=5)
    src = lyco_file(comps, tmp_path / "loha.safetensors", "loha", 1, linear_dim=4, linear_alpha=2.0)
    out = tmp_path / "k.safetensors"
    convert(src, out, ConvertOptions("kohya"))
    lora = lorakit.load_lora(out)
    te = torch.nn.Module()
    te.text_model = comps["text_encoder"]  # what LyCORIS' kohya names (lora_te_text_model_…) walk
    net, _ = create_network_from_weights(1.0, str(out), None, te, comps["unet"])
    modules = net.unet_loras + net.text_encoder_loras
    names = {kohya_module_name(p, lora.arch, False): p for p in lora.layers}
    assert sorted(m.lora_name for m in modules) == sorted(names)
    with torch.no_grad():
        for m in modules:  # LyCORIS' LoHa forward weight (its merge helper applies α/r twice; see tests/lyco.py)
            path = names[m.lora_name]
            got = m.get_weight(m.org_module[0].weight.shape)
            assert rel(got, delta(lora, path, comps)) < 1e-5, path


def test_cli_dry_run_refusals_and_inspect(xl: tuple[object, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _, d = xl
    a = d / "lora.safetensors"
    out = tmp_path / "o.safetensors"
    assert main(["merge", f"{a}:0.5", f"{d / 'mixed.safetensors'}:1", "--rank", "4", "--dry-run",
                 "--base", str(d / "fp32")]) == 0
    assert "dry run" in capsys.readouterr().out and not out.exists()
    assert main(["resize", str(a), "-o", str(a), "--rank", "2"]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert main(["merge", f"{tmp_path / 'nope.safetensors'}:1", "-o", str(out)]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert main(["merge", f"{a}:x=1", "-o", str(out)]) == 2
    assert main(["convert", str(a), "--to", "peft"]) == 2  # no -o, no --dry-run
    assert main(["bake", str(d / "fp32"), f"{a}:1", "-o", str(d / "fp32" / "unet")]) == 2
    for argv in (["merge", f"{a}:0.5", "-o", str(out)], ["resize", str(a), "-o", str(out), "--sv-fro", "0.9"],
                 ["convert", str(a), "-o", str(out), "--to", "peft"]):
        assert main([*argv, "--json"]) == 0 and json.loads(capsys.readouterr().out)["layers"] > 0
        assert main(["inspect", str(out)]) == 0
        capsys.readouterr()


def test_peft_file_round_trips_through_kohya(tmp_path: Path) -> None:
    """A file as diffusers/PEFT write it (α and rank patterns in the header) → kohya → peft: same tensors, same α."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = tiny_sdxl_pipeline().unet  # type: ignore[attr-defined]
    cfg = {"r": 4, "lora_alpha": 3.0, "target_modules": ["to_q", "to_k", "proj_in", "conv1"],
           "rank_pattern": {"proj_in": 2}, "alpha_pattern": {"conv1": 1.5}}
    inject_adapter_in_model(LoraConfig(**cfg), unet)
    gen = torch.Generator().manual_seed(0)
    sd = {f"unet.{k}": torch.randn(v.shape, generator=gen) for k, v in get_peft_model_state_dict(unet).items()}
    meta = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in cfg.items()})}
    save_file(sd, tmp_path / "p.safetensors", meta)
    convert(tmp_path / "p.safetensors", tmp_path / "k.safetensors", ConvertOptions("kohya"))
    convert(tmp_path / "k.safetensors", tmp_path / "p2.safetensors", ConvertOptions("peft"))
    back, _ = load_file(tmp_path / "p2.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    a, b = lorakit.load_lora(tmp_path / "p.safetensors"), lorakit.load_lora(tmp_path / "p2.safetensors")
    assert {p: x.scale() for p, x in a.layers.items()} == {p: x.scale() for p, x in b.layers.items()}
    kohya = lorakit.load_lora(tmp_path / "k.safetensors")
    assert {x.alpha for p, x in kohya.layers.items() if p.endswith("conv1")} == {1.5}
