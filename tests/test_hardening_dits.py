"""Defects the CLI fuzz harness found in its SD3, Chroma, Qwen-Image, quantized and ``serve --ray`` rows
(``tests/cli_fuzz_dit_rows.py``), one test each."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.cli import main


def _one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit: error:") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


def test_qwen_image_in_one_step_makes_an_image(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    """Was "NaN/inf appeared in the latents … a LoRA weight far too high" for every ``--steps 1``: the scheduler's
    terminal stretch (``shift_terminal``) of a one-sigma schedule divides 0 by 0."""
    out = tmp_path / "one.png"
    assert main(["generate", "a cat", "--steps", "1", "-W", "64", "-H", "64", "--seed", "1", "-m",
                 str(tiny_qwen_dir), "-l", str(tmp_path), "--device", "cpu", "-o", str(out)]) == 0
    pixels = np.asarray(Image.open(out), dtype=np.float32)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0


RAY_FLAGS = [
    (["--replica-gpus", "nan"], "--replica-gpus must be a number"),  # were Ray's ValueError after it started
    (["--replica-gpus", "-1"], "--replica-gpus must be a number"),
    (["--replica-gpus", "inf"], "--replica-gpus must be a number"),
    (["--replica-gpus", "1e-9"], "--replica-gpus must be a number"),
    (["--max-ongoing", "2147483648"], "--max-ongoing must be at most 2147483647"),  # Serve's int32, at deploy
    (["--address", "127.0.0.1:99999"], "--address must be"),  # were urlparse's ValueError
    (["--address", "127.0.0.1:-5"], "--address must be"),
    (["--port", "99999999999999"], "a port is 0…65535"),  # was OverflowError from bind() (full CLI fuzz run)
    (["-l", "LOOP"], "a symlink that loops"),  # was RuntimeError from resolve() (a serve@ray rerun)
]


@pytest.mark.parametrize("flags,words", RAY_FLAGS)
def test_serve_ray_flags_ray_would_refuse_are_refused_before_ray_starts(
        flags: list[str], words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.serve_ray import run

    def started(*args: object) -> int:
        raise AssertionError("Ray would start")

    monkeypatch.setattr(run, "import_serve", started)  # start_ray checks the address, then imports Ray
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    flags = [str(tmp_path / "loop") if f == "LOOP" else f for f in flags]
    assert main(["serve", "--ray", "--port", "0", "--options-file", str(tmp_path / "o.json"), *flags]) == 2
    err = capsys.readouterr().err  # lorakit's line ("lorakit: error: …" or "lorakit serve: port …")
    assert err.count("\n") == 1 and err.startswith("lorakit") and words in err and "Traceback" not in err, err


def test_a_serve_config_with_nan_gpus_is_not_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was exit 0 and a config whose ``num_gpus: .nan`` ``serve deploy`` fails on."""
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--write-serve-config", str(out), "--replica-gpus", "nan", "--options-file",
                 str(tmp_path / "o.json")]) == 2
    _one_error_line(capsys, "--replica-gpus")
    assert not out.exists()


def test_an_sd3_size_past_its_positional_table_is_refused_before_sampling(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Was diffusers' ValueError ("Height (128) cannot be greater than pos_embed_max_size") from inside the
    sampling loop: the tiny SD3 covers 96 patches a side, 384 px; SD3-Medium 192 (3072 px)."""
    from tests.sd3_factories import tiny_sd3_pipeline

    model = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(model)  # type: ignore[attr-defined]
    out = tmp_path / "big.png"
    assert main(["generate", "a cat", "--steps", "1", "-W", "512", "-H", "64", "-m", str(model), "-l",
                 str(tmp_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err  # the model's loading messages, then the error
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lorakit: error: width must be at "
                                                                             "most 384"), err[-500:]
    assert not out.exists()


def test_a_lora_folder_holding_a_symlink_loop_lists_its_loras(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Was OSError (ELOOP) from the library walk: ``list``, ``generate -l``, ``serve``, a training preview."""
    import shutil

    from tests.conftest import ROOT

    shutil.copyfile(ROOT / "examples" / "loras" / "demo_style.safetensors", tmp_path / "style.safetensors")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    assert main(["list", "-l", str(tmp_path), "--json"]) == 0
    assert '"style"' in capsys.readouterr().out
