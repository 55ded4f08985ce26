"""What the library lists is what works: truncated or malformed files are listed with their error (``list``, both
APIs), the base is decided from shapes more often and a sidecar never overrides them, an unknown base is shown as
"may not fit", and trigger phrases are split and de-duplicated."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as st_load

from lorakit.cli import main
from lorakit.errors import UnreadableFile
from lorakit.files.io import save_file
from lorakit.keymap.arch import Arch
from lorakit.library import Library
from lorakit.library import summary as summary_mod
from lorakit.library.listing import a1111_loras, entry_dict, fit
from lorakit.library.sidecars import base_from_words
from lorakit.library.summary import summarise
from lorakit.library.training import merge_phrases, split_phrases

from .conftest import REAL_LORAS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"
INK = EXAMPLES / "ink_sketch_sd15.safetensors"  # 110 KB header: summarised from its two ends
DEMO = EXAMPLES / "demo_style.safetensors"


def _header_len(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int(struct.unpack("<Q", f.read(8))[0])


def _resized(src: Path, dst: Path, size: int) -> Path:
    """``src``'s header and data, cut or zero-extended to ``size`` bytes (sparse: nothing but the header written)."""
    with src.open("rb") as f:
        head = f.read(min(size, _header_len(src)))
    with dst.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return dst


def _kohya(path: Path, widths: dict[str, int], metadata: dict[str, str] | None = None, rank: int = 2) -> Path:
    """A kohya LoRA whose module ``name`` has input width ``widths[name]`` (output 8)."""
    tensors = {}
    for name, width in widths.items():
        tensors[f"{name}.lora_down.weight"] = torch.zeros(rank, width)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(8, rank)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path, metadata)
    return path


def test_a_good_long_header_is_vouched_for_by_its_ends(read_header_calls: list[Path]) -> None:
    """The scan stays fast: the last entry's end offset equals the data size, so the middle is not parsed."""
    assert summarise(INK).base == Arch.SD1 and read_header_calls == []


@pytest.mark.parametrize("cut", [1, 1000, "half"])
def test_truncated_files_are_errors(tmp_path: Path, cut: int | str, read_header_calls: list[Path]) -> None:
    for src in (INK, DEMO, REAL_LORAS / "cloneofsimo_sd15_disney.safetensors"):
        full = src.stat().st_size
        size = full // 2 if cut == "half" else full - int(cut)
        bad = _resized(src, tmp_path / f"cut_{src.name}", size)
        with pytest.raises(UnreadableFile, match=f"cut_{src.name}") as e:
            summarise(bad)
        assert "truncated" in str(e.value) or "outside the file" in str(e.value) or "header claims" in str(e.value)
    assert read_header_calls  # the ends could not vouch for them: the whole header said why


def test_appended_bytes_and_non_lora_files_are_errors(tmp_path: Path) -> None:
    appended = tmp_path / "appended.safetensors"
    appended.write_bytes(INK.read_bytes() + b"\0" * 16)  # safetensors refuses it: "file not fully covered"
    embedding = save_file_path(tmp_path / "embedding.safetensors", {"emb_params": torch.zeros(2, 768)})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 300)
    with pytest.raises(UnreadableFile, match="appended.safetensors"):
        summarise(appended)
    with pytest.raises(UnreadableFile, match="no LoRA layers.*emb_params"):
        summarise(embedding)
    with pytest.raises(UnreadableFile, match="garbage.safetensors"):
        summarise(garbage)


def save_file_path(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_cut_or_extension_of_a_real_file_is_an_error(tmp_path: Path, data: st.DataObject) -> None:
    src = INK if data.draw(st.booleans()) else DEMO
    full = src.stat().st_size
    size = data.draw(st.integers(0, full - 1) | st.integers(full + 1, full + 4096))
    bad = _resized(src, tmp_path / "x.safetensors", size)
    with pytest.raises(UnreadableFile, match="x.safetensors"):
        summarise(bad)


def test_broken_files_are_listed_with_their_error_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    shutil.copy(INK, root / "ink.safetensors")
    shutil.copy(DEMO, root / "demo_style.safetensors")
    _resized(INK, root / "torn.safetensors", INK.stat().st_size - 4096)
    lib = Library([root], index=tmp_path / "i.sqlite3")
    torn = lib.entry(root / "torn.safetensors")
    assert torn.error and "torn.safetensors" in torn.error and entry_dict(torn)["error"] == torn.error
    assert fit(torn, Arch.SD1) == {"compatible": False, "fit": "no", "reason": "the file cannot be used (see its error)"}
    assert fit(lib.entry(root / "ink.safetensors"), Arch.SD1) == {"compatible": True, "fit": "yes", "reason": None}
    # A1111's list has no place for an error: only what loads is offered to its clients
    assert sorted(e["name"] for e in a1111_loras(lib)) == ["demo_style", "ink"]
    assert main(["list", "--lora-dir", str(root), "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)["loras"]}
    assert listed["torn"]["error"] == torn.error and listed["ink"]["error"] is None
    assert main(["list", "--lora-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"error: {torn.error}" in out and "UNREADABLE" in out and "3 of 3 LoRAs, 1 unreadable" in out


def test_middle_of_a_long_header_decides_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  read_header_calls: list[Path]) -> None:
    """Ends that do not tell fall back to the whole header, where the shapes decide (not the metadata)."""
    widths = {f"lora_unet_a{i:02d}_attn1_to_q": 320 for i in range(30)}
    widths |= {f"lora_unet_z{i:02d}_attn1_to_q": 320 for i in range(30)}
    widths["lora_unet_m_attn2_to_k"] = 1024  # SD2's text width, in the middle
    path = _kohya(tmp_path / "sd2.safetensors", widths, {"ss_base_model_version": "sdxl_base_v1-0"})
    monkeypatch.setattr(summary_mod, "HEAD", 2000)
    monkeypatch.setattr(summary_mod, "TAIL", 2000)
    monkeypatch.setattr(summary_mod, "KEYS", 600)
    assert summarise(path).base == Arch.SD2 and read_header_calls == [path]


def test_shapes_decide_unnamed_and_lokr_layers(tmp_path: Path) -> None:
    disney = st_load(str(REAL_LORAS / "cloneofsimo_sd15_disney.safetensors"))
    unet_only = {k: v for k, v in disney.items() if k.startswith("unet:")}  # numbered layers: no names to read
    save_file(unet_only, tmp_path / "unet_only.safetensors")
    assert summarise(tmp_path / "unet_only.safetensors").base == Arch.SD1
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    save_file({f"{module}.lokr_w1": torch.zeros(4, 32), f"{module}.lokr_w2": torch.zeros(160, 64)},
              tmp_path / "lokr.safetensors")  # input width 32 · 64 = 2048: SDXL's text width
    s = summarise(tmp_path / "lokr.safetensors")
    assert (s.base, s.types) == (Arch.SDXL, ["lokr"])


def test_shapes_win_over_metadata_and_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    _kohya(root / "sd2_te.safetensors", {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": 1024},
           {"ss_base_model_version": "sd_v1"})
    (root / "sd2_te.civitai.info").write_text(json.dumps({"baseModel": "SDXL 1.0"}))
    shutil.copy(DEMO, root / "demo_style.safetensors")
    (root / "demo_style.civitai.info").write_text(json.dumps({"baseModel": "SD 1.5"}))
    _kohya(root / "tiny.safetensors", {"lora_unet_x_attn2_to_k": 32})  # widths of no known model
    (root / "tiny.civitai.info").write_text(json.dumps({"baseModel": "SD 1.5"}))
    _kohya(root / "tiny_flux.safetensors", {"lora_unet_x_attn2_to_k": 32})
    (root / "tiny_flux.civitai.info").write_text(json.dumps({"baseModel": "Flux.1 D"}))
    lib = Library([root], index=tmp_path / "i.sqlite3")
    bases = {e.name: e.base for e in lib.entries}
    assert bases == {"sd2_te": Arch.SD2, "demo_style": Arch.DEMO, "tiny": Arch.SD1, "tiny_flux": Arch.FLUX1}
    # the case: Civitai's "SD 1.5" beside the demo model's LoRA no longer dims it on the demo model
    assert fit(lib.entry(root / "demo_style.safetensors"), Arch.DEMO)["fit"] == "yes"
    assert fit(lib.entry(root / "demo_style.safetensors"), Arch.SD1)["fit"] == "no"
    assert fit(lib.entry(root / "tiny_flux.safetensors"), Arch.SD1)["reason"] == \
        "made for FLUX.1; the model is Stable Diffusion 1.x"


def test_unknown_base_may_not_fit_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    _kohya(root / "tiny.safetensors", {"lora_unet_x_attn2_to_k": 32})
    e = Library([root], index=tmp_path / "i.sqlite3").entry(root / "tiny.safetensors")
    assert e.base == Arch.UNKNOWN and not e.error
    for arch, model in ((Arch.SD1, "Stable Diffusion 1.x"), (Arch.DEMO, "the embedded demo model")):
        verdict = fit(e, arch)
        assert verdict["compatible"] is False and verdict["fit"] == "maybe"
        assert "base model unknown" in verdict["reason"] and f"may not fit {model}" in verdict["reason"]
    sd1 = Library([EXAMPLES], index=tmp_path / "j.sqlite3").entry(INK)
    assert fit(sd1, Arch.UNKNOWN) == {"compatible": False, "fit": "maybe", "reason": "the model's architecture is "
                                      "unknown: a LoRA for Stable Diffusion 1.x may not fit it"}


@pytest.mark.parametrize("words,base", [("SD 1.5", "sd1"), ("SD 1.5 LCM", "sd1"), ("SD1", "sd1"),
                                        ("SD 2.1 768", "sd2"), ("SDXL 1.0", "sdxl"), ("Pony", "sdxl"),
                                        ("Illustrious", "sdxl"), ("Flux.1 D", "flux1"),
                                        ("Flux.2 Klein", "FLUX.2"), ("Chroma", "chroma"), ("Qwen", "qwen-image"),
                                        ("SD 3.5 Large", "Stable Diffusion 3"), ("Hunyuan 1", None),
                                        ("Other", None), ("Unknown", None), ("", None)])
def test_sidecar_base_words(words: str, base: str | None) -> None:
    assert base_from_words(words) == base


def test_trigger_phrases_split_and_deduplicated(tmp_path: Path) -> None:
    assert split_phrases(" inksketch, monochrome ,, (red, blue:1.2), <lora:x:0.5>, ") == \
        ["inksketch", "monochrome", "(red, blue:1.2)", "<lora:x:0.5>"]
    assert merge_phrases([["Ink, mono"], ["ink", "MONO, bold"], ["Bold", "extra"]]) == ["Ink", "mono", "bold", "extra"]
    root = tmp_path / "loras"
    root.mkdir()
    _kohya(root / "ink.safetensors", {"lora_unet_x_attn2_to_k": 768},
           {"modelspec.trigger_phrase": "Ink Sketch, bold lines",
            "ss_tag_frequency": json.dumps({"10_x": {"ink sketch": 9, "paper": 5}})})
    (root / "ink.json").write_text(json.dumps({"activation text": "ink sketch, (mono, chrome:1.1)"}))
    (root / "ink.civitai.info").write_text(json.dumps({"trainedWords": ["INK SKETCH", "bold lines, paper"]}))
    e = Library([root], index=tmp_path / "i.sqlite3").entry(root / "ink.safetensors")
    assert e.trigger_phrases == ["ink sketch", "(mono, chrome:1.1)", "bold lines", "paper"]
    assert e.explicit_trigger_words == e.trigger_phrases  # what the generator's auto trigger words read
    assert e.trigger_words == ["ink sketch", "(mono, chrome:1.1)", "bold lines", "paper"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.text(alphabet=st.sampled_from("aAbB ,()x:1."), max_size=12), max_size=3), max_size=4))
def test_merged_phrases_are_clean_and_unique(sources: list[list[str]]) -> None:
    merged = merge_phrases(sources)
    assert all(p and p == p.strip() for p in merged)
    assert len({p.casefold() for p in merged}) == len(merged)
    every = [p.casefold() for s in sources for t in s for p in split_phrases(t)]
    assert [p.casefold() for p in merged] == list(dict.fromkeys(every))  # order of first appearance
