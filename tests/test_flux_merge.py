"""merge and resize on FLUX.1 files, held to ``apply_loras`` on the tiny FLUX.1: concat of a kohya (BFL) and a
diffusers LoRA is exact and keeps the fused layers whole; svd merges and resize report the error they cost and the
file applies within it; a change that reads the whole fused weight needs the base model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import ToolError
from lorakit.files.io import load_file, save_file
from lorakit.tools.merge import MergeOptions, merge
from lorakit.tools.resize import ResizeOptions, resize
from lorakit.tools.svd import RankRule
from tests.flux_factories import H, bfl_lora, kohya_keys, tiny_flux_pipeline, wide_qkv_lora
from tests.test_flux_convert import _diffusers_file

NAMES = ("transformer", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.nn.Module], Path]:
    d = tmp_path_factory.mktemp("fluxmerge")
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(d / "model")  # type: ignore[attr-defined]
    tr = pipe.transformer  # type: ignore[attr-defined]
    save_file(kohya_keys(bfl_lora(tr, "lora", seed=1)), d / "kohya.safetensors")
    _diffusers_file(tr, d / "diffusers.safetensors", seed=2)
    kinds = {"qkv": "lokr", "linear1": "dora-in", "adaLN_modulation.1": "loha"}
    save_file(kohya_keys(bfl_lora(tr, lambda b: next((k for s, k in kinds.items() if b.endswith(s)), "lora"), seed=3)),
              d / "lyco.safetensors")
    return {n: getattr(pipe, n) for n in NAMES}, d


def _deltas(comps: dict[str, torch.nn.Module], specs: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """ΔW per transformer parameter that ``apply_loras`` makes (fp64), changed ones only."""
    tr = comps["transformer"]
    before = {n: p.detach().double().clone() for n, p in tr.named_parameters()}
    with lorakit.apply_loras(comps, specs):
        after = {n: p.detach().double().clone() for n, p in tr.named_parameters()}
    return {n: after[n] - before[n] for n in before if not torch.equal(after[n], before[n])}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_concat_of_kohya_and_diffusers_is_exact_and_keeps_fused_layers(model: tuple[dict, Path],
                                                                       tmp_path: Path) -> None:
    comps, d = model
    out = tmp_path / "m.safetensors"
    report = merge([f"{d / 'kohya.safetensors'}:0.7", f"{d / 'diffusers.safetensors'}:-0.4"], out)
    assert report.tool == "merge (concat)" and report.notes == []
    sd = load_file(out)[0]
    assert not any(k.startswith("lora_transformer_") for k in sd)
    # one block for the kohya qkv (its shared down), one per separately trained diffusers part: 4 + 3·4
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (16, H)
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * H, 4 + 4 * 4)
    assert sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"].shape == (2 * H, 8)
    assert max(report.per_component().values()) < 1e-6
    want = _deltas(comps, [(d / "kohya.safetensors", 0.7), (d / "diffusers.safetensors", -0.4)])
    got = _deltas(comps, [(out, 1.0)])
    assert set(got) == set(want)
    for n, w in want.items():
        assert _rel(got[n], w) < 1e-5, n


def test_svd_merge_needs_the_base_for_changes_that_read_the_fused_weight(model: tuple[dict, Path],
                                                                         tmp_path: Path) -> None:
    comps, d = model
    out = tmp_path / "s.safetensors"
    specs = [f"{d / 'lyco.safetensors'}:0.8", f"{d / 'diffusers.safetensors'}:0.5"]
    with pytest.raises(ToolError, match=r"single_transformer_blocks\.\d\.\S+: the ΔW of a dora\(lora\) layer depends "
                                        r"on the base weight"):
        merge(specs, out, MergeOptions(method="svd", rule=RankRule("rank", 64)))
    report = merge(specs, out, MergeOptions(method="svd", rule=RankRule("rank", 64), base=d / "model"))
    assert max(report.per_component().values()) < 1e-5  # rank 64 ≥ every part's rank: lossless
    assert any("baked for the base weight" in x.note for x in report.layers)
    sd = load_file(out)[0]
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in sd  # parts fused back block-diagonally
    want = _deltas(comps, [(d / "lyco.safetensors", 0.8), (d / "diffusers.safetensors", 0.5)])
    got = _deltas(comps, [(out, 1.0)])
    for n, w in want.items():
        if n.endswith(".weight"):
            assert _rel(got[n], w) < 1e-4, n
    small = merge(specs, tmp_path / "r4.safetensors", MergeOptions(method="svd", rule=RankRule("rank", 2),
                                                                   base=d / "model"))
    assert 0.05 < small.per_component()["transformer"] < 1
    _within_reported(comps, want, tmp_path / "r4.safetensors", small)


def _within_reported(comps: dict[str, torch.nn.Module], want: dict[str, torch.Tensor], path: Path,
                     report: object) -> None:
    """The file applies within the error its report states: the transformer's √(Σ‖ΔW − ΔW'‖²)/√(Σ‖ΔW‖²) over
    the weights it changes."""
    got = _deltas(comps, [(path, 1.0)])
    weights = [n for n in want if n.endswith(".weight")]
    err = math.sqrt(sum(float((got.get(n, 0 * want[n]) - want[n]).pow(2).sum()) for n in weights))
    norm = math.sqrt(sum(float(want[n].pow(2).sum()) for n in weights))
    stated = report.per_component()["transformer"]  # type: ignore[attr-defined]
    assert abs(err / norm - stated) <= 1e-4 + 1e-3 * stated, (err / norm, stated)


@pytest.mark.parametrize("src", ["kohya", "diffusers", "lyco"])
def test_resize_keeps_the_file_layout_and_reports_its_error(model: tuple[dict, Path], tmp_path: Path,
                                                            src: str) -> None:
    comps, d = model
    path = d / f"{src}.safetensors"
    same = resize(path, tmp_path / "same.safetensors", ResizeOptions(RankRule("rank", 64)))
    assert max(same.per_component().values(), default=0) == 0
    if src != "diffusers":  # a rank ≥ every layer's: the file's own tensors, bit for bit
        a, b = load_file(tmp_path / "same.safetensors")[0], load_file(path)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "r.safetensors"
    report = resize(path, out, ResizeOptions(RankRule("rank", 2)))
    sd = load_file(out)[0]
    assert not any(k.startswith("lora_transformer_") for k in sd)
    if src == "kohya":  # a fused layer is resized whole: rank 2, not three rank-2 parts
        assert sd["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"].shape == (2, H)
    if src == "diffusers":  # its parts are resized apart and fused block-diagonally
        assert sd["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"].shape == (6, H)
    if src == "lyco":
        notes = {x.path: x.note for x in report.layers}
        assert notes["transformer.final_layer.adaLN_modulation.1"] == "loha → LoRA"  # BFL rows, resized whole
        assert notes["transformer.single_blocks.0.linear1"] == "DoRA magnitude kept"
    want = _deltas(comps, [(path, 1.0)])
    if src == "lyco":  # a DoRA layer's error is that of its inner change (the normalisation follows it)
        assert set(_deltas(comps, [(out, 1.0)])) == set(want)
    else:
        _within_reported(comps, want, out, report)


def test_loras_of_other_widths_or_families_are_refused(model: tuple[dict, Path], tmp_path: Path) -> None:
    _, d = model
    save_file(wide_qkv_lora(), tmp_path / "wide.safetensors")
    with pytest.raises(ToolError, match=r"double_blocks\.0\.img_attn\.qkv: the inputs \(kohya.safetensors, "
                                        r"wide.safetensors\) give its parts different shapes"):
        merge([str(d / "kohya.safetensors"), str(tmp_path / "wide.safetensors")], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    from tests.factories import make_kohya_lora, tiny_components

    save_file(make_kohya_lora(tiny_components("sd1"), "lora", seed=1), tmp_path / "sd.safetensors")
    with pytest.raises(ToolError, match="unet.conv_in: not a FLUX.1 transformer"):  # a tiny SD file: arch unknown
        merge([str(d / "kohya.safetensors"), str(tmp_path / "sd.safetensors")], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
