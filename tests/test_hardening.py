"""The defects of issue 21, one test each: every bad input to tools, grid, batch, train, serve and the header
reader is one ``LorakitError`` (exit 2, one line), in bounded memory and time, and never a file lorakit refuses."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from PIL import Image

import lorakit
from lorakit.batch.jobs import read_jobs
from lorakit.cli import main
from lorakit.errors import BatchError, GridError, ToolError, TrainDataError
from lorakit.files.inputs import nesting_within
from lorakit.files.io import read_header, save_file
from lorakit.tools.checkpoint import to_checkpoint
from lorakit.tools.extract import ExtractOptions, extract
from lorakit.tools.merge import MergeOptions, merge
from lorakit.tools.svd import RankRule
from lorakit.train.data import MAX_CAPTION_BYTES, scan

from .conftest import REAL_LORAS, ROOT
from .factories import make_kohya_lora, tiny_components, tiny_sd1_pipeline

SD1 = REAL_LORAS / "diffusers_attnprocs_sd15_pokemon.safetensors"


def _one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit: error:") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


@pytest.fixture(scope="module")
def unknown_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA of the tiny test model: lorakit cannot tell its base (its shapes are no real model's)."""
    path = tmp_path_factory.mktemp("loras") / "tiny.safetensors"
    save_file(make_kohya_lora(tiny_components("sd1"), "lora", rank=2), path)
    assert lorakit.load_lora(path).arch == "unknown"
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    pipe = tiny_sd1_pipeline()
    save_file(to_checkpoint(pipe, "sd1"), d / "base.safetensors")
    with torch.no_grad():
        pipe.unet.down_blocks[0].attentions[0].proj_in.weight.add_(0.01)  # type: ignore[attr-defined]
        pipe.unet.down_blocks[0].attentions[0].proj_in.weight[0, 0] = float("nan")  # type: ignore[attr-defined]
    save_file(to_checkpoint(pipe, "sd1"), d / "nan.safetensors")
    return {"base": d / "base.safetensors", "nan": d / "nan.safetensors"}


# -- tools ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--method", "svd", "--rank", "2"]])
def test_merge_of_an_unknown_base_and_an_sd1_lora_names_the_layer(extra: list[str], unknown_base: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = ["-o", str(tmp_path / "m.safetensors")] if "--dry-run" not in extra else []
    assert main(["merge", str(unknown_base), str(SD1), *out, *extra]) == 2
    _one_error_line(capsys, "tiny.safetensors is for a 32×32 weight", SD1.name, "different models")
    assert not list(tmp_path.iterdir())


def test_merge_that_overflows_is_refused_not_reported_exact(unknown_base: Path, tmp_path: Path) -> None:
    for dry in (True, False):
        with pytest.raises(ToolError, match="NaN or infinite"):
            merge([f"{unknown_base}:1e308", f"{unknown_base}:1e308"], tmp_path / "inf.safetensors",
                  MergeOptions(dry_run=dry))
    assert not list(tmp_path.iterdir())


def test_resize_sv_ratio_nan_is_refused_like_the_other_rules(unknown_base: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--sv-ratio", "--sv-fro", "--sv-cumulative"):
        for value in ("nan", "inf"):
            assert main(["resize", str(unknown_base), flag, value, "--dry-run"]) == 2
            _one_error_line(capsys, flag)
    with pytest.raises(ToolError, match="finite"):
        RankRule("sv_ratio", float("nan"))


def test_extract_with_nan_in_the_tuned_model_names_the_tensor(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="proj_in.weight: the tuned model holds NaN"):
        extract(models["base"], models["nan"], tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_extract_of_identical_or_unrelated_models_writes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="identical"):
        extract(models["base"], models["base"], tmp_path / "x.safetensors")
    other = tmp_path / "other.safetensors"  # the same architecture's names, every shape different
    save_file({k: torch.zeros(3) for k in read_header(models["base"]).tensors}, other)
    with pytest.raises(ToolError, match="share 0 of .* not a model and its base"):
        extract(models["base"], other, tmp_path / "x.safetensors", ExtractOptions(RankRule("rank", 2)))
    assert [p.name for p in tmp_path.iterdir()] == ["other.safetensors"]


# -- grid -------------------------------------------------------------------------------------------------------
def test_grid_counts_z_and_caps_cells_before_building_any(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["grid", "a", "--x", "seed=1-100", "--y", "seed=1-100", "--z", "seed=1-1000", "-W", "64", "-H", "64"]
    assert main(argv) == 2  # 10⁷ cells: refused at once (it once built them at ~25 MB/s)
    _one_error_line(capsys, "10000000 cells", "100 × 100 × 1000")
    assert main(["grid", "a", "--x", "seed=1-100", "--y", "seed=1-60", "-W", "64", "-H", "64"]) == 2
    _one_error_line(capsys, "6000 cells")
    assert main(["grid", "a", "--x", "seed=1-25", "--y", "seed=1-25", "--z", "seed=1-3", "-W", "512", "-H",
                 "512"]) == 2  # each PNG is 164 MP, all three 492 MP (held until drawn): the Z grids are counted
    _one_error_line(capsys, "grids would hold")


# -- batch and serve: JSON ------------------------------------------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_in_a_batch_line_is_a_batch_error(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a"}\n{"prompt": "b", "x": ' + DEEP + "}\n")
    with pytest.raises(BatchError, match=r"jobs.jsonl:2: nested deeper than 64 levels"):
        read_jobs(jobs)
    jobs.write_text('{"prompt": "a", "cfg_scale": NaN}\n')
    with pytest.raises(BatchError, match=r"jobs.jsonl:1: field 'cfg_scale': .*finite"):
        read_jobs(jobs)


@pytest.mark.parametrize("line", [DEEP, '{"key": "000001-x", "images": 5}', '{"key": "000001-x", "images": '
                                  '["../../../etc/passwd"]}', '{"key": "000001-x", "images": [' + DEEP + "]}"])
def test_results_lines_that_are_odd_run_the_item_again(line: str, tmp_path: Path) -> None:
    from lorakit.batch.results import finished

    (tmp_path / "results.jsonl").write_text(line + "\n")
    assert finished(tmp_path) == set()


def test_serve_starts_with_a_deep_options_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)  # started: that is all we need
    options = tmp_path / "options.json"
    options.write_text('{"a": ' + DEEP + "}")
    assert main(["serve", "--options-file", str(options), "--port", "0"]) == 0
    assert "serving" in capsys.readouterr().out


# -- train ------------------------------------------------------------------------------------------------------
def _image(path: Path, caption: str | bytes | None = "a circle") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 20, 20)).save(path)
    if caption is not None:
        txt = path.with_suffix(".txt")
        txt.write_bytes(caption if isinstance(caption, bytes) else caption.encode())


def test_caption_files_are_read_bounded_and_must_be_text(tmp_path: Path) -> None:
    _image(tmp_path / "big" / "a.png")
    with open(tmp_path / "big" / "a.txt", "wb") as f:
        f.truncate(3 << 30)  # 3 GiB, sparse: once read whole (3.5 GB of memory)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TrainDataError, match=f"a.txt: unusable caption .*at most {MAX_CAPTION_BYTES:,}"):
        scan(tmp_path / "big")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    _image(tmp_path / "nul" / "a.png", b"\0" * 100)
    with pytest.raises(TrainDataError, match="not a text caption .*U\\+0000"):
        scan(tmp_path / "nul")
    _image(tmp_path / "latin" / "a.png", "caf\xe9".encode("latin-1"))
    with pytest.raises(TrainDataError, match="not UTF-8|codec"):
        scan(tmp_path / "latin")
    _image(tmp_path / "bom" / "a.png", "\ufeffa red square".encode())
    assert scan(tmp_path / "bom").items[0].caption == "a red square"


def test_symlinks_out_of_the_data_folder_or_looping_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _image(outside / "secret.png", "the outside text")
    data = tmp_path / "data"
    _image(data / "a.png")
    (data / "b.png").symlink_to(outside / "secret.png")
    with pytest.raises(TrainDataError, match="b.png: a symlink to .*outside the data folder"):
        scan(data)
    (data / "b.png").unlink()
    _image(data / "b.png", None)
    (data / "b.txt").symlink_to(outside / "secret.txt")  # its text once went into the LoRA's metadata
    with pytest.raises(TrainDataError, match="b.txt: a symlink to .*outside"):
        scan(data)
    (data / "b.txt").unlink()
    (data / "b.txt").write_text("b")
    (data / "10_again").symlink_to(data)  # a loop: the images would train twice (and 10 times more)
    with pytest.raises(TrainDataError, match="10_again: the same folder as"):
        scan(data)
    (data / "10_again").unlink()
    (data / "self").symlink_to(data / "self")
    with pytest.raises(TrainDataError, match="self: a symlink that loops"):
        scan(data)
    (data / "self").unlink()
    (data / "sub").mkdir()
    (data / "sub" / "c.png").symlink_to(data / "a.png")
    with pytest.raises(TrainDataError, match="c.png: the same image as"):
        scan(data)


# -- the header reader --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["escapes", "escaped_quotes", "strings", "brackets_in_strings"])
def test_json_nesting_check_is_linear_in_memory(kind: str) -> None:
    n = 4 << 20
    text = {"escapes": '{"a": "' + "\\\\" * (n // 2) + '"}', "escaped_quotes": '{"a": "' + '\\"' * (n // 2) + '"}',
            "strings": "[" + '"",' * (n // 3) + '""]', "brackets_in_strings": '["' + "[{" * (n // 2) + '"]'}[kind]
    tracemalloc.start()
    try:
        assert nesting_within(text, 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(text), f"{peak / len(text):.1f} bytes per byte"  # once ~130 bytes per escape


def test_a_32_mb_header_of_escapes_reads_in_bounded_memory(tmp_path: Path) -> None:
    meta = json.dumps({"__metadata__": {"x": "\\" * (16 << 20)}}).encode()  # 16 Mi backslashes, escaped: 32 MB
    path = tmp_path / "escapes.safetensors"
    path.write_bytes(len(meta).to_bytes(8, "little") + meta)
    code = ("import re, sys; from lorakit.files.header import read_header; h = read_header(sys.argv[1]); "
            "print(len(h.metadata['x']), re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=True)
    length, rss_kib = map(int, r.stdout.split())
    assert length == 16 << 20 and rss_kib < 400_000, r.stdout  # peak resident: 0.1 GB (was 2.1 GB)


# -- found by the CLI fuzz harness (tests/cli_fuzz.py) -------------------------------------------------------------
def test_settings_file_that_is_a_fifo_or_too_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # read_text() blocked until someone wrote to it
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 50_000 + "]" * 50_000)  # tomllib recurses once per level
    for path, words in ((fifo, "a FIFO"), (deep, "nested too deeply")):
        assert main(["generate", "a", "--config", str(path), "-o", str(tmp_path / "x.png")]) == 2
        _one_error_line(capsys, "unreadable settings file", words)


def test_weights_that_overflow_fp32_are_refused_before_any_change(unknown_base: Path) -> None:
    from lorakit.errors import WeightSpecError

    comps = tiny_components("sd1")
    before = {k: v.clone() for k, v in comps["unet"].state_dict().items()}
    lora = lorakit.load_lora(unknown_base)
    for weight in (1e308, {"lbw": "nan," + "1," * 15 + "1"}):
        with pytest.raises(WeightSpecError, match="beyond 1e\\+30|finite"):
            with lorakit.apply_loras(comps, [(lora, weight)]):
                pass
    assert all(torch.equal(v, before[k]) for k, v in comps["unet"].state_dict().items())


def test_tool_flags_and_paths_found_by_fuzzing(unknown_base: Path, models: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "folder").mkdir()
    for argv, words in ((["resize", str(unknown_base), "--rank", "1", "--device", "mps", "--dry-run"], ["mps"]),
                        (["extract", str(models["base"]), str(models["base"]), "--min-diff", "nan", "--dry-run"],
                         ["--min-diff"]),
                        (["convert", str(unknown_base), "--to", "kohya", "-o", str(loop)], ["loop"]),
                        (["merge", str(unknown_base), "--base", str(loop), "--dry-run"], ["loop"]),
                        (["bake", str(tmp_path / "folder"), str(unknown_base), "-o", str(tmp_path / "folder")],
                         ["folder"])):
        assert main(argv) == 2, argv
        _one_error_line(capsys, *words)


def test_json_files_of_models_and_lora_folders_are_read_bounded(tmp_path: Path, unknown_base: Path) -> None:
    from lorakit.library import Library
    from lorakit.tools.modelfile import open_model

    lib = tmp_path / "loras"
    lib.mkdir()
    (lib / "a.safetensors").write_bytes(unknown_base.read_bytes())
    os.mkfifo(lib / "a.civitai.info")  # a sidecar that is a FIFO: the scan once blocked on it
    (lib / "a.json").write_text(DEEP)
    entry = Library([lib]).entries[0]
    assert entry.error is None or "Recursion" not in entry.error
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "config.json").write_text(DEEP)
    with pytest.raises(ToolError, match="config.json: unreadable .*nested deeper"):
        open_model(model)


def test_generate_writes_a_png_whatever_the_output_is_named(tmp_path: Path) -> None:
    out = tmp_path / "image.safetensors"  # PIL chose the format by the name: a ValueError after the image was made
    assert main(["generate", "a red circle", "--steps", "1", "--seed", "1", "-o", str(out)]) == 0
    assert Image.open(out).format == "PNG"


def test_text_that_is_not_unicode_is_refused_before_the_tokenizer(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Undecodable bytes on a command line arrive as lone surrogates ('\\udcff'); the tokenizer raised TypeError."""
    for argv in (["generate", "\udcff a", "--steps", "1", "-o", str(tmp_path / "a.png")],
                 ["generate", "a", "-n", "\udcff", "--steps", "1", "-o", str(tmp_path / "a.png")],
                 ["grid", "a", "--x", "prompt=a,\udcff", "--steps", "1", "-o", str(tmp_path / "g.png")]):
        assert main(argv) == 2, argv
        assert "lone surrogate" in capsys.readouterr().err
    _image(tmp_path / "data" / "a.png")
    assert main(["train", str(tmp_path / "data"), "-o", str(tmp_path / "t.safetensors"), "--trigger", "\udcff"]) == 2
    _one_error_line(capsys, "--trigger", "lone surrogate")
    (tmp_path / "data" / "10_\udcff").mkdir()
    with pytest.raises(TrainDataError, match="not valid UTF-8"):
        scan(tmp_path / "data")


def test_an_empty_output_path_is_the_working_folder_and_refused(unknown_base: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``-o ""`` once ran the tool and wrote nothing with exit 0; ``serve --options-file ""`` used the default."""
    for argv in (["convert", str(unknown_base), "--to", "kohya", "-o", ""], ["serve", "--options-file", "", "--port",
                                                                           "0"]):
        assert main(argv) == 2
        _one_error_line(capsys, "names a folder by its place")


@pytest.mark.parametrize("resolution", [8192 + 64, 1 << 20, 2147483648])
def test_a_huge_training_resolution_is_refused_before_the_buckets_are_listed(resolution: int) -> None:
    """``--resolution 2147483648`` listed 33 million buckets (4 GiB; found by the CLI fuzz run)."""
    from lorakit.errors import TrainingError
    from lorakit.train.buckets import MAX_RESOLUTION, bucket_sizes

    with pytest.raises(TrainingError, match=f"from 64 to {MAX_RESOLUTION}, got {resolution}"):
        bucket_sizes(resolution)
    assert max(max(s) for s in bucket_sizes(MAX_RESOLUTION)) <= 2 * MAX_RESOLUTION


def test_serve_with_a_model_that_is_a_symlink_loop_names_it(tmp_path: Path) -> None:
    """``serve -m LOOP --models-dir DIR`` was a RuntimeError from ``Path.resolve`` (found by the full CLI fuzz run);
    the entry is made and loading it is the loader's one-line ``ModelError``."""
    from lorakit.errors import ModelError
    from lorakit.models.loading import load_model
    from lorakit.server.models import entry_for

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    entry = entry_for(str(loop), [tmp_path])
    assert entry.title == "loop"
    with pytest.raises(ModelError, match="loop"):
        load_model(str(loop), device="cpu")


def test_bake_of_a_single_file_into_a_name_without_safetensors_is_refused(models: dict[str, Path],
                                                                         unknown_base: Path, tmp_path: Path) -> None:
    """``bake flux1.safetensors L -o out`` wrote ``out``, which no tool opens as a model (found by the full CLI fuzz
    run's FLUX rows): refused before any work, nothing written."""
    from lorakit.tools.bake import bake

    with pytest.raises(ToolError, match="name it NAME.safetensors"):
        bake(models["base"], [str(unknown_base)], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_serve_write_serve_config_refuses_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--write-serve-config FIFO`` blocked on the FIFO (a plain ``write_text``); it is an output like any other."""
    pytest.importorskip("yaml")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["serve", "--write-serve-config", str(fifo), "-l", str(ROOT / "examples" / "loras"),
                 "--options-file", str(tmp_path / "o.json")]) == 2
    _one_error_line(capsys, "FIFO")
    assert fifo.is_fifo()
