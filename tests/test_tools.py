"""merge and resize on LyCORIS-written files: concat is exact, SVD merges report the error they cost, resize picks
exactly the rank its rule says and keeps the strength; the writer's hashes and atomic renames."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError, ToolError
from lorakit.files.hashes import file_hashes
from lorakit.files.io import save_file
from lorakit.tools.merge import MergeOptions, merge
from lorakit.tools.output import Entry, entries_of, write_safetensors
from lorakit.tools.resize import ResizeOptions, resize
from lorakit.tools.svd import RankRule, choose_rank

from .factories import tiny_components
from .tools_helpers import delta, lyco_file, rel, weight_of


@pytest.fixture(scope="module")
def comps() -> dict[str, torch.nn.Module]:
    return tiny_components("sd1", seed=3)


@pytest.fixture(scope="module")
def files(comps: dict[str, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    meta_a = {"modelspec.trigger_phrase": "inkcat", "ss_tag_frequency": json.dumps({"1_a": {"ink": 3, "cat": 2}})}
    return {
        "a": lyco_file(comps, d / "a.safetensors", "lora", 0, metadata=meta_a, linear_dim=4, linear_alpha=2.0,
                       conv_dim=4, conv_alpha=8.0),
        "b": lyco_file(comps, d / "b.safetensors", "lora", 1, metadata={"modelspec.trigger_phrase": "blue"},
                       linear_dim=3, linear_alpha=1.5, conv_dim=2, conv_alpha=1.0),
        "c": lyco_file(comps, d / "c.safetensors", "lora", 2, linear_dim=2, linear_alpha=2.0),
        "loha": lyco_file(comps, d / "loha.safetensors", "loha", 3, linear_dim=4, linear_alpha=2.0, conv_dim=4,
                          conv_alpha=2.0),
        "lokr": lyco_file(comps, d / "lokr.safetensors", "lokr", 4, linear_dim=4, linear_alpha=2.0),
        "full": lyco_file(comps, d / "full.safetensors", "full", 5, te=False, linear_dim=4, linear_alpha=1.0),
        "dora": lyco_file(comps, d / "dora.safetensors", "lora", 6, linear_dim=4, linear_alpha=2.0, dora_wd=True),
        "oft": lyco_file(comps, d / "oft.safetensors", "diag-oft", 7, linear_dim=8, linear_alpha=1.0),
    }


def _expected(comps: dict[str, torch.nn.Module], parts: list[tuple[Path, dict[str, object]]]) \
        -> dict[str, torch.Tensor]:
    """Σ strength·ΔW per layer, strength as ``apply_loras`` resolves each weight spec for the layer."""
    out: dict[str, torch.Tensor] = {}
    for path, spec in parts:
        lora, weight = lorakit.load_lora(path), lorakit.as_weight(spec)
        for layer in lora.layers:
            s = weight.for_path(layer, "unknown")
            if s:
                out[layer] = out.get(layer, 0) + delta(lora, layer, comps, s)  # type: ignore[assignment]
    return out


def test_concat_merge_equals_applying_the_inputs(comps: dict[str, torch.nn.Module], files: dict[str, Path],
                                                 tmp_path: Path) -> None:
    specs = [(files["a"], 0.7, "0.7"), (files["b"], {"te": 0.5, "unet": -1.2}, "te=0.5:unet=-1.2"),
             (files["c"], {"weight": 1.0, "lbw": "INALL"}, "1:lbw=INALL")]
    out = tmp_path / "m.safetensors"
    report = merge([f"{p}:{text}" for p, _, text in specs], out)
    merged = lorakit.load_lora(out)
    expected = _expected(comps, [(p, s if isinstance(s, dict) else {"weight": s}) for p, s, _ in specs])
    assert set(merged.layers) == set(expected) and report.tool == "merge (concat)"
    for path, want in expected.items():
        adapter = merged.layers[path]
        assert adapter.alpha == adapter.rank  # α/r folded into the factors
        assert rel(delta(merged, path, comps), want) <= 1e-5, path
    zero = {p for p, _ in report.left_out}  # INALL puts c's OUT blocks at 0: left out, said so
    assert any(".up_blocks." in p for p in zero) or not zero
    with lorakit.apply_loras(comps, [(out, 1.0)]):
        got = {p: weight_of(comps, p).clone() for p in expected}
    with lorakit.apply_loras(comps, [(p, s) for p, s, _ in specs]):
        for p, w in got.items():
            torch.testing.assert_close(w, weight_of(comps, p), rtol=0, atol=1e-6)


def test_kohya_style_merge_would_be_wrong(comps: dict[str, torch.nn.Module], files: dict[str, Path],
                                          tmp_path: Path) -> None:
    """The defect fixed: kohya's merge adds (Σ sᵢUᵢ)(Σ sᵢDᵢ), sᵢ = √(αᵢ/α₀)·mᵢ — cross terms, weights squared —
    tens of percent away from Σ mᵢ·ΔWᵢ, which the concat merge reproduces."""
    other = lyco_file(comps, tmp_path / "d.safetensors", "lora", 9, te=False, linear_dim=4, linear_alpha=1.0)
    a, d = lorakit.load_lora(files["a"]), lorakit.load_lora(other)
    path = next(p for p in a.layers if p.endswith("to_q"))
    (ua, da, sa), (ud, dd, sd) = a.layers[path].low_rank(), d.layers[path].low_rank()  # type: ignore[misc]
    ra, rd = 0.7, 0.5
    alpha_a, alpha_d = a.layers[path].alpha, d.layers[path].alpha
    s1, s2 = ra, math.sqrt(alpha_d / alpha_a) * rd  # type: ignore[operator]
    kohya = ((ua * s1 + ud * s2) @ (da * s1 + dd * s2)) * sa
    exact = (ua @ da) * sa * ra + (ud @ dd) * sd * rd
    assert rel(kohya, exact) > 0.3
    out = tmp_path / "m.safetensors"
    merge([f"{files['a']}:{ra}", f"{other}:{rd}"], out)
    assert rel(delta(lorakit.load_lora(out), path, comps), exact) < 1e-5


def test_svd_merge_reports_the_error_it_measures(comps: dict[str, torch.nn.Module], files: dict[str, Path],
                                                 tmp_path: Path) -> None:
    base = tmp_path / "base"
    _save_folder(comps, base)
    parts = [("loha", 0.6), ("lokr", 0.8), ("full", 0.5), ("dora", 0.9), ("oft", 0.7)]
    out = tmp_path / "svd.safetensors"
    report = merge([f"{files[k]}:{w}" for k, w in parts], out, MergeOptions(rule=RankRule("rank", 3), base=base))
    merged = lorakit.load_lora(out)
    expected = _expected(comps, [(files[k], {"weight": w}) for k, w in parts])
    by_path = {x.path: x for x in report.layers}
    for path, want in expected.items():
        measured = rel(delta(merged, path, comps), want)
        assert math.isclose(by_path[path].rel, measured, rel_tol=1e-3, abs_tol=1e-6), path
    assert any("dora" in x.note and "0.9" in x.note for x in report.layers)
    assert any("oft" in x.note for x in report.layers)
    stored = json.loads(merged.metadata["lorakit.report"])
    assert set(stored["relative_error"]) == {"text_encoder", "unet"} and stored["worst"]
    with pytest.raises(ToolError, match="depends on the base weight"):
        merge([f"{files['dora']}:1"], tmp_path / "x.safetensors", MergeOptions(rule=RankRule("rank", 2)))


def _save_folder(comps: dict[str, torch.nn.Module], folder: Path) -> None:
    """A diffusers-style folder of the tiny components (what the tools read of a model)."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for name, module in comps.items():
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(module.config.to_dict() if hasattr(
            module.config, "to_dict") else dict(module.config)))
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  folder / name / ("model.safetensors" if name != "unet" else "diffusion_pytorch_model.safetensors"))


def test_merge_output_metadata_names_sources_and_hashes(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    merge([f"{files['a']}:0.7", f"{files['b']}:te=0.5:unet=1"], out)
    meta = lorakit.load_lora(out).metadata
    sources = json.loads(meta["lorakit.sources"])
    assert [s["file"] for s in sources] == ["a.safetensors", "b.safetensors"]
    assert sources[0]["sha256"] == hashlib.sha256(files["a"].read_bytes()).hexdigest()
    assert [s["weight"] for s in sources] == ["0.7", "te=0.5:unet=1"]
    assert meta["modelspec.trigger_phrase"].split(", ")[:2] == ["inkcat", "ink"] and "blue" in meta[
        "modelspec.trigger_phrase"]
    assert "a/1_a" in json.loads(meta["ss_tag_frequency"])
    assert meta["sshs_model_hash"] == file_hashes(out).addnet


def test_sshs_hashes_are_those_of_the_written_file(tmp_path: Path) -> None:
    out = tmp_path / "big.safetensors"
    tensors = {"a": torch.arange(600_000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}
    meta = write_safetensors(out, entries_of(tensors), {"ss_x": "1", "other": "y"}, sshs=True)
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert lorakit.files.io.read_metadata(out)["sshs_legacy_hash"] == meta["sshs_legacy_hash"]


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"

    def boom() -> torch.Tensor:
        raise KeyboardInterrupt

    entries = [Entry("a", torch.float32, (2,), lambda: torch.zeros(2)), Entry("b", torch.float32, (2,), boom)]
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(out, entries)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rule, expect", [
    (RankRule("rank", 100), 6), (RankRule("rank", 2), 2), (RankRule("sv_ratio", 4), 3),
    (RankRule("sv_ratio", 3.99), 2), (RankRule("sv_ratio", 1e9), 6), (RankRule("sv_fro", 0.99), 3),
    (RankRule("sv_fro", 0.9), 2), (RankRule("sv_fro", 1.0), 6), (RankRule("sv_cumulative", 0.9), 4),
    (RankRule("sv_cumulative", 0.5), 1), (RankRule("sv_fro", 0.99, max_rank=2), 2)])
def test_rank_rules_keep_exactly_what_they_say(rule: RankRule, expect: int) -> None:
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    assert choose_rank(s, rule) == expect
    assert choose_rank(torch.zeros(3), rule) == 0


@pytest.mark.parametrize("bad", [{"method": "rank", "value": 0}, {"method": "sv_fro", "value": 1.5},
                                 {"method": "sv_ratio", "value": 0.5}, {"method": "nope", "value": 1}])
def test_bad_rank_rules_are_tool_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ToolError):
        RankRule(**bad)  # type: ignore[arg-type]


def _spectrum_lora(path: Path, s: list[float], alpha: float) -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(32, len(s), generator=gen)).Q
    v = torch.linalg.qr(torch.randn(48, len(s), generator=gen)).Q
    up, down = u * torch.tensor(s), v.T
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_out.lora_up.weight": up.contiguous(),
               "lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight": down.contiguous(),
               "lora_unet_down_blocks_0_attentions_0_proj_out.alpha": torch.tensor(alpha)}, path)


@pytest.mark.parametrize("rule, expect", [(RankRule("sv_fro", 0.98), 2), (RankRule("sv_cumulative", 0.8), 2),
                                          (RankRule("sv_ratio", 2.0), 2), (RankRule("rank", 3), 3)])
def test_resize_dynamic_rank_without_off_by_one_and_strength_kept(tmp_path: Path, rule: RankRule,
                                                                  expect: int) -> None:
    """s = 8, 4, 1, 0.5, 0.25: √((64+16)/81.3) = 0.992 ≥ 0.98 at k = 2 (kohya keeps 3); Σ 12/13.75 = 0.87."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _spectrum_lora(src, [8.0, 4.0, 1.0, 0.5, 0.25], alpha=2.5)
    report = resize(src, out, ResizeOptions(rule))
    a, b = lorakit.load_lora(src), lorakit.load_lora(out)
    path = next(iter(a.layers))
    assert b.layers[path].rank == expect
    full = a.layers[path].delta(torch.zeros(32, 48), 1.0).double()
    u, s, vh = torch.linalg.svd(full)
    want = (u[:, :expect] * s[:expect]) @ vh[:expect]
    got = b.layers[path].delta(torch.zeros(32, 48), 1.0).double()
    assert rel(got, want) < 1e-5  # α' = (α/r)·k: the kept part at its original strength
    assert math.isclose(report.layers[0].rel, rel(got, full), rel_tol=1e-3)


def test_resize_to_a_larger_rank_is_bit_exact(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    report = resize(files["a"], out, ResizeOptions(RankRule("rank", 64)))
    a, b = lorakit.load_lora(files["a"]), lorakit.load_lora(out)
    assert set(a.layers) == set(b.layers) and all(x.err2 == 0 for x in report.layers)
    for path, adapter in a.layers.items():
        assert all(torch.equal(t, b.layers[path].t[k]) for k, t in adapter.t.items()), path


def test_resize_other_types_and_errors(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    report = resize(files["loha"], out, ResizeOptions(RankRule("rank", 2)))
    assert set(lorakit.load_lora(out).network_types) <= {"lora", "locon"} and report.per_component()["unet"] > 0
    with pytest.raises(ToolError, match="overwrite the input"):
        resize(files["a"], files["a"], ResizeOptions(RankRule("rank", 2)))
    with pytest.raises(LorakitError):
        resize(tmp_path / "missing.safetensors", out, ResizeOptions(RankRule("rank", 2)))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_kohya_names_of_every_full_size_layer_read_back(arch: str) -> None:
    """The writer's names (LDM for SDXL, as sd-scripts writes; diffusers for SD1) read back to the same layer."""
    from lorakit.formats.writers import kohya_module_name
    from lorakit.models.configs import build_components

    from .factories import layer_paths

    paths = list(layer_paths(build_components(arch)))
    names = {kohya_module_name(p, arch, arch == "sdxl") for p in paths}  # raises on a name that reads back wrong
    assert len(names) == len(paths) and any("input_blocks_4_1" in n for n in names) == (arch == "sdxl")
