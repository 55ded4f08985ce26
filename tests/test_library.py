"""The LoRA library: scan, SQLite index (re-scan reads only what changed), header summaries without torch,
sidecars, names confined to the folders, ``lorakit list``."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.library import Library, LoraNameError
from lorakit.library import library as libmod
from lorakit.library.listing import incompatibility
from lorakit.library.summary import summarise

from .conftest import REAL_LORAS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    (root / "styles").mkdir(parents=True)
    shutil.copy(EXAMPLES / "ink_sketch_sd15.safetensors", root / "styles" / "ink.safetensors")
    shutil.copy(EXAMPLES / "demo_style.safetensors", root / "demo_style.safetensors")
    for f in REAL_LORAS.glob("*.*"):
        if f.suffix != ".md":
            shutil.copy(f, root / f.name)
    return root


def test_summaries_agree_with_the_full_loader(folder: Path) -> None:
    from lorakit import load_lora

    for path in sorted(folder.rglob("*.*")):
        s, full = summarise(path), load_lora(path)
        # the demo model's LoRAs: the library names their base (for the page); the loader leaves it unknown
        assert s.base == full.arch or (s.base, full.arch) == ("demo", "unknown"), path.name
        assert s.rank in (full.rank, None), path.name
        kinds = {t.split("(")[0] for t in full.network_types}
        assert set(s.types) <= kinds | {"locon"} and s.types, path.name


def test_long_header_read_at_its_ends_agrees_with_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.library import summary

    whole = summarise(EXAMPLES / "ink_sketch_sd15.safetensors")  # 110 KB header: read in two parts
    monkeypatch.setattr(summary, "HEAD", 10 ** 9)
    full = summarise(EXAMPLES / "ink_sketch_sd15.safetensors")
    assert (whole.base, whole.types, whole.rank, whole.alpha, whole.components) == \
        (full.base, full.types, full.rank, full.alpha, full.components)
    assert whole.tensors is None and full.tensors == 792


def test_spaced_header_from_another_writer_is_parsed_exactly(tmp_path: Path) -> None:
    src = EXAMPLES / "ink_sketch_sd15.safetensors"
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, indent=1).encode()  # spaces, newlines; same tensors
    (tmp_path / "spaced.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    s = summarise(tmp_path / "spaced.safetensors")
    assert (s.base, s.types, s.rank, s.tensors) == ("sd1", ["lora"], 2, 792)


def test_foreign_and_sdxl_files_are_told_apart(tmp_path: Path) -> None:
    import torch

    from lorakit.files.io import save_file

    t = torch.zeros(2, 8)
    save_file({f"lora_unet_double_blocks_{i}_img_attn_proj.lora_down.weight": t for i in range(3)},
              tmp_path / "flux.safetensors", {"ss_base_model_version": "flux1"})
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": t,
               "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight": torch.zeros(2, 2048),
               "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.hada_w1_a": t},
              tmp_path / "xl.safetensors", {})
    assert summarise(tmp_path / "flux.safetensors").base == "flux1"
    xl = summarise(tmp_path / "xl.safetensors")
    assert (xl.base, xl.types, xl.components) == ("sdxl", ["loha", "lora"], ["unet", "te2"])


def test_scan_indexes_once_and_rescans_only_changes(folder: Path, tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite3"
    lib = Library([folder], index=index)
    assert lib.last_scan["files"] == 5 and lib.last_scan["parsed"] == 5
    again = Library([folder], index=index)
    assert again.last_scan["parsed"] == 0
    assert {e.subpath: e.base for e in again.entries} == {e.subpath: e.base for e in lib.entries}
    target = folder / "demo_style.safetensors"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10 ** 9))
    (folder / "styles" / "ink.safetensors").rename(folder / "styles" / "ink2.safetensors")
    stats = again.refresh()
    assert (stats["parsed"], stats["removed"], stats["files"]) == (2, 1, 5)
    assert "styles/ink2" in {e.subpath for e in again.entries}


def test_scan_needs_no_torch(folder: Path, tmp_path: Path) -> None:
    code = (f"import sys; from lorakit.library import Library; "
            f"lib = Library([{str(folder / 'styles')!r}], index={str(tmp_path / 'x.sqlite3')!r}); "
            f"assert lib.entries[0].base == 'sd1'; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parallel_scan_gives_the_same_index(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(12):
        shutil.copy(EXAMPLES / "demo_style.safetensors", folder / f"copy_{i}.safetensors")
    serial = Library([folder], index=tmp_path / "a.sqlite3")
    monkeypatch.setattr(libmod, "PARALLEL_FROM", 2)
    parallel = Library([folder], index=tmp_path / "b.sqlite3")  # forked workers
    assert [(e.subpath, e.info) for e in serial.entries] == [(e.subpath, e.info) for e in parallel.entries]
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait)  # as in a server: other threads alive → spawned workers
    busy.start()
    try:
        spawned = Library([folder], index=tmp_path / "c.sqlite3")
    finally:
        stop.set()
        busy.join()
    assert [(e.subpath, e.info) for e in serial.entries] == [(e.subpath, e.info) for e in spawned.entries]


def test_sidecars_trigger_words_preview_and_their_changes(folder: Path, tmp_path: Path) -> None:
    (folder / "styles" / "ink.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "styles" / "ink.civitai.info").write_text(json.dumps({"trainedWords": ["ink_style", "sketchy"],
                                                                    "baseModel": "SD 1.5"}))
    (folder / "styles" / "ink.json").write_text(json.dumps({"activation text": "inksketch, monochrome",
                                                            "preferred weight": 0.7, "negative text": "color",
                                                            "sd version": "SD1", "notes": "my notes"}))
    index = tmp_path / "i.sqlite3"
    ink = Library([folder], index=index).entry(folder / "styles" / "ink.safetensors")
    assert ink.sidecars.preview == "ink.preview.png"
    assert ink.sidecars.preferred_weight == 0.7 and ink.sidecars.negative_text == "color"
    assert ink.trigger_words[:4] == ["inksketch", "monochrome", "ink_style", "sketchy"]
    assert "lineart" in ink.trigger_words  # from ss_tag_frequency, after the declared ones
    assert ink.trigger_words.count("inksketch") == 1  # also a training tag: listed once
    assert ink.explicit_trigger_words == ink.trigger_phrases == ["inksketch", "monochrome", "ink_style", "sketchy"]
    (folder / "styles" / "ink.json").write_text(json.dumps({"activation text": "changed"}))
    os.utime(folder / "styles" / "ink.json", ns=(1, 2 * 10 ** 18))
    lib = Library([folder], index=index)
    assert lib.last_scan["sidecars"] == 1 and lib.last_scan["parsed"] == 0
    assert lib.entry(folder / "styles" / "ink.safetensors").explicit_trigger_words[0] == "changed"


def test_broken_files_are_listed_with_their_error(folder: Path, tmp_path: Path) -> None:
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (folder / "bad.json").write_text("{")
    (folder / "bad.safetensors").write_bytes((EXAMPLES / "demo_style.safetensors").read_bytes())
    lib = Library([folder], index=tmp_path / "i.sqlite3")
    broken = lib.entry(folder / "broken.safetensors")
    assert broken.info["error"] and "broken.safetensors" in broken.info["error"]
    assert lib.entry(folder / "bad.safetensors").sidecars.problems[0].startswith("bad.json: unreadable")


def test_names_resolve_only_inside_the_folders(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copy(EXAMPLES / "demo_style.safetensors", outside)
    lib = Library([folder], index=tmp_path / "i.sqlite3")
    assert lib.resolve("styles/ink").path == folder / "styles" / "ink.safetensors"
    assert lib.resolve("ink_sketch") is lib.entry(folder / "styles" / "ink.safetensors")  # ss_output_name alias
    for name in ("../outside", str(outside), str(outside.with_suffix("")), "styles/../../outside"):
        with pytest.raises(LoraNameError, match="no LoRA named"):
            lib.resolve(name)


def test_a_file_added_later_is_found_by_name(folder: Path, tmp_path: Path) -> None:
    lib = Library([folder], index=tmp_path / "i.sqlite3")
    shutil.copy(EXAMPLES / "demo_style.safetensors", folder / "fresh.safetensors")
    assert lib.resolve("fresh").path == folder / "fresh.safetensors"


def test_hashes_are_computed_once_and_kept(folder: Path, tmp_path: Path) -> None:
    from lorakit.files.hashes import file_hashes

    index = tmp_path / "i.sqlite3"
    lib = Library([folder], index=index)
    e = lib.entry(folder / "demo_style.safetensors")
    h = lib.hashes(e)
    truth = file_hashes(e.path)
    assert (h["sha256"], h["a1111_short"]) == (truth.sha256, truth.a1111_short)
    row = Library([folder], index=index).store.db.execute("SELECT sha256, addnet FROM hashes").fetchall()
    assert row == [(truth.sha256, truth.addnet)]


def test_full_metadata_is_read_once_then_kept_until_the_file_changes(folder: Path, tmp_path: Path) -> None:
    from lorakit.files.header import read_metadata

    index = tmp_path / "i.sqlite3"
    lib = Library([folder], index=index)
    e = lib.entry(folder / "styles" / "ink.safetensors")
    assert lib.store.metadata([e.file]) == {}  # not stored by the scan
    assert lib.metadata([e]) == [read_metadata(e.path)]
    assert json.loads(Library([folder], index=index).store.metadata([e.file])[e.file])["ss_output_name"] == \
        "ink_sketch"
    os.utime(e.path, ns=(e.path.stat().st_atime_ns, e.path.stat().st_mtime_ns + 10 ** 9))
    assert Library([folder], index=index).store.metadata([e.file]) == {}  # re-parsed: stale metadata dropped


def test_incompatibility_reasons() -> None:
    assert incompatibility("sd1", "sd1") is None and incompatibility("unknown", "sdxl") is None  # fit: "maybe"
    assert incompatibility("sdxl", "sd1") == "made for Stable Diffusion XL; the model is Stable Diffusion 1.x"
    assert "demo model" in str(incompatibility("sd1", "demo"))
    assert "does not apply" in str(incompatibility("Flux", "sdxl"))


def test_cli_list_text_json_filters(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--lora-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "styles/ink" in out and "inksketch" in out and "5 of 5 LoRAs" in out
    assert main(["list", "--lora-dir", str(folder), "--json", "--base", "sd1", "--search", "INK"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "lorakit.list/1"
    assert [e["subpath"] for e in data["loras"]] == ["styles/ink"]
    assert data["loras"][0]["types"] == ["lora"] and data["loras"][0]["rank"] == 2


def test_cli_list_without_folders_says_how(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAKIT_LORA_DIRS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["list"]) == 2
    assert "--lora-dir" in capsys.readouterr().err
