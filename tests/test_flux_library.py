"""FLUX.1 in the library and what shows it: the torch-free summary (base ``flux1`` with its variant, components
``transformer``/``te``/``t5``) from the header's ends when they tell, else the whole header; families lorakit does
not apply named; the index, ``lorakit list``, fit on SD/FLUX/demo models, the HTTP API and ``lorakit inspect``."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests

from lorakit.cli import main
from lorakit.keymap.arch import Arch
from lorakit.keymap.families import SUPPORTED
from lorakit.library import Library
from lorakit.library import summary as summary_mod
from lorakit.library.listing import a1111_loras, as_table, entry_dict, fit
from lorakit.library.summary import summarise

from . import flux_files as ff

INK = Path(__file__).resolve().parents[1] / "examples" / "loras" / "ink_sketch_sd15.safetensors"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flux") / "loras"
    (root / "flux").mkdir(parents=True)
    ff.kohya_flux(root / "flux" / "dev.safetensors", guidance=True)
    ff.kohya_flux(root / "flux" / "schnell.safetensors", metadata={"modelspec.architecture": "flux-1-schnell/lora"})
    ff.kohya_flux(root / "flux" / "canny.safetensors", img_in=128, guidance=True)
    ff.kohya_flux(root / "flux" / "fill.safetensors", img_in=384)
    ff.kohya_flux(root / "flux" / "plain.safetensors", clip_layers=1, t5="lora_te3_")
    ff.diffusers_flux(root / "flux" / "peft.safetensors")
    ff.chroma(root / "chroma.safetensors")
    ff.flux2(root / "flux2.safetensors")
    ff.sd3(root / "sd3.safetensors")
    (root / "ink.safetensors").write_bytes(INK.read_bytes())
    return root


VARIANTS = {"dev": "flux-1-dev", "schnell": "flux-1-schnell", "canny": "flux-1-dev-control",
            "fill": "flux-1-fill-dev", "plain": "flux-1", "peft": "flux-1"}
FOREIGN = {"flux2": "FLUX.2"}  # SD3 and Chroma are applied since issue 22 (SD3's base is its size)


# -- the summary -----------------------------------------------------------------------------------------------------
def test_summary_base_variant_and_components_agree_with_the_loader(folder: Path) -> None:
    from lorakit import load_lora

    for name, variant in VARIANTS.items():
        path = folder / "flux" / f"{name}.safetensors"
        s, full = summarise(path), load_lora(path)
        assert (s.base, s.variant) == (Arch.FLUX1, variant) == (full.arch, full.base), name
        assert s.info()["variant"] == variant and s.types == ["lora"] and s.rank == 4
    assert summarise(folder / "flux" / "dev.safetensors").components == ["transformer"]
    assert summarise(folder / "flux" / "plain.safetensors").components == ["transformer", "te", "t5"]
    assert summarise(folder / "flux" / "peft.safetensors").components == ["transformer", "t5"]
    assert summarise(INK).components == ["unet", "te"] and summarise(INK).variant is None  # SD: as before


@pytest.mark.parametrize("t5", ["lora_te3_", "lora_te2_"])  # kohya's and OneTrainer's T5 prefixes
def test_t5_keys_are_the_t5_component(tmp_path: Path, t5: str) -> None:
    s = summarise(ff.kohya_flux(tmp_path / "x.safetensors", clip_layers=1, t5=t5))
    assert s.components == ["transformer", "te", "t5"] and s.base == Arch.FLUX1


def test_families_not_applied_are_named_by_the_summary(folder: Path) -> None:
    for stem, family in FOREIGN.items():
        s = summarise(folder / f"{stem}.safetensors")
        assert (s.base, s.variant, s.types) == (family, None, ["lora"]), stem


def _long_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers of a few KB are read at their ends (as real ones of hundreds of KB are)."""
    monkeypatch.setattr(summary_mod, "HEAD", 3000)
    monkeypatch.setattr(summary_mod, "TAIL", 3000)
    monkeypatch.setattr(summary_mod, "KEYS", 800)


def test_sd3_dit_names_are_told_from_flux_by_their_widths_at_the_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_header_calls: list[Path]) -> None:
    """diffusers-layout double blocks are FLUX.1's or SD3's names: the sampled entries' widths (1536) say SD3 —
    read from the header's text, without parsing it whole (sorted keys end with block 9, below FLUX.1's 19)."""
    path = ff.sd3(tmp_path / "sd3.safetensors")
    monkeypatch.setattr(summary_mod, "HEAD", 1500)
    monkeypatch.setattr(summary_mod, "TAIL", 1500)
    monkeypatch.setattr(summary_mod, "KEYS", 600)
    assert summarise(path).base == "sd3.x-medium" and read_header_calls == []  # 1536 wide: either Medium


def test_ends_tell_a_flux_file_whose_metadata_names_the_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               read_header_calls: list[Path]) -> None:
    path = ff.kohya_flux(tmp_path / "x.safetensors", double=19, single=38, guidance=True,
                         metadata={"modelspec.architecture": "flux-1-dev/lora"})
    _long_header(monkeypatch)
    ends = summarise(path)
    assert (ends.base, ends.variant, ends.components, ends.tensors) == (Arch.FLUX1, "flux-1-dev", ["transformer"], None)
    assert read_header_calls == []
    monkeypatch.setattr(summary_mod, "HEAD", 10 ** 9)  # the whole header agrees
    whole = summarise(path)
    assert (whole.base, whole.variant, whole.components, whole.rank, whole.alpha) == \
        (ends.base, ends.variant, ends.components, ends.rank, ends.alpha)


@pytest.mark.parametrize("img_in,guidance,variant", [
    (None, True, "flux-1-dev"), (None, False, "flux-1"), (128, True, "flux-1-dev-control"),
    (384, False, "flux-1-fill-dev")])
def test_the_middle_of_the_header_tells_the_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   read_header_calls: list[Path], img_in: int | None,
                                                   guidance: bool, variant: str) -> None:
    """guidance_in and img_in keys sort between the double and the single blocks: without a variant in the
    metadata the whole header is read, and its shapes and names decide."""
    path = ff.kohya_flux(tmp_path / "x.safetensors", double=19, single=38, guidance=guidance, img_in=img_in,
                         metadata={"modelspec.architecture": "flux-1/lora", "ss_base_model_version": "flux1"})
    _long_header(monkeypatch)
    s = summarise(path)
    assert (s.base, s.variant) == (Arch.FLUX1, variant) and read_header_calls == [path]


def test_a_component_in_the_middle_is_not_missed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 read_header_calls: list[Path]) -> None:
    """CLIP-L layers fill the head and the T5 layer sorts after them: the head ends in CLIP-L and the tail begins
    in the transformer, so another component may hide between — the whole header is read."""
    path = ff.kohya_flux(tmp_path / "x.safetensors", double=19, single=38, clip_layers=12, t5="lora_te3_",
                         metadata={"modelspec.architecture": "flux-1-dev/lora"})
    _long_header(monkeypatch)
    s = summarise(path)
    assert s.components == ["transformer", "te", "t5"] and read_header_calls == [path]


# -- the index, list, fit ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Library:
    return Library([folder], index=tmp_path_factory.mktemp("index") / "i.sqlite3")


def _entry(library: Library, subpath: str) -> Any:
    return next(e for e in library.entries if e.subpath == subpath)


def test_the_index_keeps_base_and_variant(library: Library) -> None:
    for name, variant in VARIANTS.items():
        e = _entry(library, f"flux/{name}")
        assert (e.base, e.variant, e.error) == ("flux1", variant, None)
        assert entry_dict(e)["variant"] == variant and entry_dict(e)["base"] == "flux1"
    assert _entry(library, "ink").variant is None and entry_dict(_entry(library, "ink"))["variant"] is None
    assert {_entry(library, s).base for s in FOREIGN} == set(FOREIGN.values())
    assert _entry(library, "sd3").base == "sd3.x-medium"
    assert library.refresh()["parsed"] == 0 and _entry(library, "flux/dev").variant == "flux-1-dev"  # from the index


def test_an_index_of_the_previous_layout_is_rebuilt(folder: Path, tmp_path: Path) -> None:
    index = tmp_path / "i.sqlite3"
    Library([folder], index=index)
    with sqlite3.connect(index) as db:  # rows written before the variant was indexed
        db.execute("UPDATE loras SET info = json_remove(info, '$.variant')")
        db.execute("PRAGMA user_version=4")
    lib = Library([folder], index=index)
    assert lib.last_scan["parsed"] == len(lib.entries) and _entry(lib, "flux/fill").variant == "flux-1-fill-dev"


def test_search_by_base_or_variant(library: Library) -> None:
    assert [e.subpath for e in library.search("flux-1-dev")] == ["flux/dev"]
    assert len(library.search("flux1")) == len(VARIANTS)
    assert [e.subpath for e in library.search("chroma")] == ["chroma"]


def test_fit_on_sd_flux_and_demo_models(library: Library) -> None:
    dev, canny, fill = (_entry(library, f"flux/{n}") for n in ("dev", "canny", "fill"))
    ink, chroma = _entry(library, "ink"), _entry(library, "chroma")
    assert fit(dev, Arch.SD1) == {"compatible": False, "fit": "no",
                                  "reason": "made for FLUX.1 (flux-1-dev); the model is Stable Diffusion 1.x"}
    assert fit(ink, Arch.FLUX1) == {"compatible": False, "fit": "no",
                                    "reason": "made for Stable Diffusion 1.x; the model is FLUX.1"}
    assert fit(dev, Arch.DEMO)["reason"] == "made for FLUX.1 (flux-1-dev); the model is the embedded demo model"
    for name in ("dev", "schnell", "plain", "peft"):  # dev and schnell LoRAs are interchangeable
        assert fit(_entry(library, f"flux/{name}"), Arch.FLUX1) == {"compatible": True, "fit": "yes", "reason": None}
    assert fit(canny, Arch.FLUX1) == {
        "compatible": False, "fit": "maybe",
        "reason": "made for FLUX.1 Canny or Depth (flux-1-dev-control): lorakit widens a FLUX.1 model's input layer "
                  "for it, and it needs the control image (--control-image, the API's lorakit_control_image)"}
    assert fit(fill, Arch.FLUX1)["fit"] == "maybe" and "needs a FLUX.1 Fill model" in fit(fill, Arch.FLUX1)["reason"]
    assert fit(fill, Arch.SDXL)["reason"] == "made for FLUX.1 (flux-1-fill-dev); the model is Stable Diffusion XL"
    assert chroma.base == Arch.CHROMA and fit(chroma, Arch.CHROMA) == {"compatible": True, "fit": "yes", "reason": None}
    for model, name in ((Arch.FLUX1, "FLUX.1"), (Arch.SD1, "Stable Diffusion 1.x")):  # Chroma's own: not on FLUX.1
        assert fit(chroma, model) == {"compatible": False, "fit": "no",
                                      "reason": f"made for Chroma; the model is {name}"}
    assert fit(dev, Arch.CHROMA) == {"compatible": True, "fit": "yes", "reason": "made for FLUX.1, which Chroma takes: "
                                     "its layers for modules this model lacks are reported, not applied"}


def test_a_flux_pipelines_arch_fits_flux_loras(library: Library) -> None:
    from lorakit import apply_loras, load_lora
    from lorakit.patch.targets import model_arch

    from .flux_factories import tiny_flux_components

    comps = tiny_flux_components()
    arch = model_arch(comps)
    assert arch == Arch.FLUX1 and fit(_entry(library, "flux/dev"), arch)["fit"] == "yes"
    canny = _entry(library, "flux/canny")
    verdict = fit(canny, arch)  # 'maybe': it needs a control image; lorakit widens the plain model's img_in for it
    assert verdict["fit"] == "maybe" and "control image" in verdict["reason"] and "widens" in verdict["reason"]
    inputs = comps["transformer"].x_embedder.in_features
    patcher = apply_loras(comps, [(load_lora(canny.path), 1.0)])
    assert comps["transformer"].x_embedder.in_features == 128 != inputs  # the LoRA's img_in width
    patcher.restore()
    assert comps["transformer"].x_embedder.in_features == inputs


def test_table_shows_the_variant(library: Library) -> None:
    table = as_table(library.search())
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:]}
    assert rows["flux/dev"] == "flux-1-dev" and rows["flux/fill"] == "flux-1-fill-dev" and rows["ink"] == "sd1"
    assert rows["chroma"] == "chroma" and rows["flux/plain"] == "flux-1"


def test_cli_list_json_variant_and_base_filter(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--lora-dir", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "lorakit.list/1"
    by_name = {e["subpath"]: e for e in data["loras"]}
    assert by_name["flux/schnell"]["variant"] == "flux-1-schnell" and by_name["ink"]["variant"] is None
    assert by_name["sd3"]["base"] == "sd3.x-medium" and by_name["sd3"]["variant"] is None
    assert main(["list", "--lora-dir", str(folder), "--base", "flux-1-dev-control"]) == 0
    out = capsys.readouterr().out
    assert "flux/canny  flux-1-dev-control" in out and "1 of 10 LoRAs" in out


def test_a1111_list_stays_a1111_shaped(library: Library) -> None:
    items = {i["name"]: i for i in a1111_loras(library)}
    assert set(items["dev"]) == {"name", "alias", "path", "metadata"} and items["schnell"]["metadata"] == \
        {"modelspec.architecture": "flux-1-schnell/lora"}


def test_http_lists_show_variant_and_fit(folder: Path, tmp_path: Path) -> None:
    from lorakit.models.loading import demo_model
    from lorakit.server import create_app

    from .servers import running

    app = create_app(demo_model(), Library([folder], index=tmp_path / "i.sqlite3"))
    with running(app) as url:
        data = requests.get(f"{url}/lorakit/v1/loras", timeout=30).json()
        by_name = {e["subpath"]: e for e in data["loras"]}
        assert data["model"]["arch"] == "demo" and len(by_name) == 10
        assert (by_name["flux/dev"]["variant"], by_name["flux/dev"]["fit"]) == ("flux-1-dev", "no")
        assert by_name["chroma"]["reason"] == "made for Chroma; the model is the embedded demo model"
        only = requests.get(f"{url}/lorakit/v1/loras", params={"base": "flux-1-fill-dev"}, timeout=30).json()
        assert [e["subpath"] for e in only["loras"]] == ["flux/fill"]
        a1111 = requests.get(f"{url}/sdapi/v1/loras", timeout=30).json()
        assert all(set(i) == {"name", "alias", "path", "metadata"} for i in a1111) and len(a1111) == 10
        # the loaded model's arch as patch.targets.model_arch gives it for a FLUX pipeline: the list follows it
        app.state.lorakit.model.arch = Arch.FLUX1
        data = requests.get(f"{url}/lorakit/v1/loras", timeout=30).json()
        by_name = {e["subpath"]: e for e in data["loras"]}
        assert data["model"]["arch"] == "flux1" and by_name["flux/schnell"]["fit"] == "yes"
        assert by_name["flux/canny"]["fit"] == "maybe" and by_name["ink"]["fit"] == "no"
        assert by_name["ink"]["reason"] == "made for Stable Diffusion 1.x; the model is FLUX.1"


# -- inspect ---------------------------------------------------------------------------------------------------------
def _inspect(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    assert main(["inspect", "--json", str(path)]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_inspect_bfl_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _inspect(capsys, folder / "flux" / "plain.safetensors")
    assert (info["family"], info["architecture"], info["base"], info["variant"], info["supported"]) == \
        ("FLUX.1", "flux1", "flux-1", "flux-1", True)
    assert info["modules"] == {"transformer": 25, "text_encoder": 4, "text_encoder_2": 1}
    assert info["encoders"] == {"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"}
    assert info["layout"] == "bfl" and info["unrecognised_keys"] == []
    assert info["fused_layers"] == [
        {"layer": "double_blocks.*.img_attn.qkv", "count": 2, "into": ["attn.to_q", "attn.to_k", "attn.to_v"],
         "halves_swapped": False},
        {"layer": "double_blocks.*.txt_attn.qkv", "count": 2,
         "into": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "halves_swapped": False},
        {"layer": "final_layer.adaLN_modulation.1", "count": 1, "into": ["norm_out.linear"], "halves_swapped": True},
        {"layer": "single_blocks.*.linear1", "count": 2,
         "into": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "halves_swapped": False}]
    assert main(["inspect", str(folder / "flux" / "canny.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "architecture  FLUX.1 (flux-1-dev-control)" in text and "transformer 27" in text
    assert "single_blocks.*.linear1 ×2 → attn.to_q, attn.to_k, attn.to_v, proj_mlp" in text
    assert "final_layer.adaLN_modulation.1 → norm_out.linear, halves swapped" in text


def test_inspect_diffusers_layout_and_the_python_call(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit import load_lora
    from lorakit.describe import describe

    path = folder / "flux" / "peft.safetensors"
    info = _inspect(capsys, path)
    assert (info["layout"], info["fused_layers"], info["modules"]) == \
        ("diffusers", [], {"transformer": 7, "text_encoder_2": 1})
    assert describe(path, load_lora(path)) == info  # the loaded LoRA given: the same report
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "text_encoder_2 (T5-XXL) 1" in text and "layout        diffusers names" in text


@pytest.mark.parametrize("stem", sorted(FOREIGN))
def test_inspect_names_a_family_not_applied(folder: Path, capsys: pytest.CaptureFixture[str], stem: str) -> None:
    family = FOREIGN[stem]
    info = _inspect(capsys, folder / f"{stem}.safetensors")
    assert (info["family"], info["base"], info["architecture"], info["supported"], info["dialect"]) == \
        (family, family, family, False, None)
    assert info["note"] == f"lorakit does not apply {family} LoRAs yet (it applies {SUPPORTED})"
    assert SUPPORTED.startswith("Stable Diffusion 1.x, 2.x and XL, FLUX.1, Stable Diffusion 3 / 3.5, ")
    assert info["network_types"] == ["lora"] and info["tensors"] > 0 and info["layers"] == 0
    assert main(["inspect", str(folder / f"{stem}.safetensors")]) == 0
    text = capsys.readouterr().out
    assert f"family        {family}\n" in text and f"applied       no: lorakit does not apply {family}" in text


def test_inspect_of_a_foreign_file_reads_no_tensor(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit import describe as describe_mod

    def no_tensors(path: object) -> None:
        raise AssertionError("tensors read")

    monkeypatch.setattr(describe_mod, "load_file", no_tensors)  # a FLUX.2 LoRA can be GBs: its header says it all
    assert describe_mod.describe(folder / "flux2.safetensors")["supported"] is False
