"""LoRA folders from lorakit.toml and $LORAKIT_LORA_DIRS; command-line folders replace both."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import lorakit
from lorakit.settings import load_settings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


def test_config_file_and_environment_are_combined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "lorakit.toml"
    cfg.write_text(f'model = "/models/sd15"\nlora_dirs = ["{tmp_path / "a"}"]\nembedding_dirs = ["{tmp_path / "e"}"]\n')
    monkeypatch.setenv("LORAKIT_LORA_DIRS", os.pathsep.join([str(tmp_path / "b"), str(tmp_path / "c")]))
    s = load_settings(str(cfg))
    assert s.model == "/models/sd15" and s.embedding_dirs == [tmp_path / "e"]
    assert s.lora_dirs == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]


def test_settings_file_found_in_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAKIT_LORA_DIRS", raising=False)
    (tmp_path / "lorakit.toml").write_text(f'lora_dirs = ["{EXAMPLES}"]\n')
    assert load_settings().lora_dirs == [EXAMPLES]


def test_bad_settings_file(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text("lora_dirs = 3\n")
    with pytest.raises(lorakit.LorakitError, match="must be lists of folders"):
        load_settings(str(tmp_path / "x.toml"))
    (tmp_path / "y.toml").write_text("lora_dirs = [\n")
    with pytest.raises(lorakit.LorakitError, match="unreadable settings file"):
        load_settings(str(tmp_path / "y.toml"))


def test_generate_uses_the_environment_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAKIT_LORA_DIRS", str(EXAMPLES))
    assert main(["generate", "a cat <lora:demo_style:0.5>", "--steps", "1", "-W", "64", "-H", "64", "-o",
                 str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists()


def test_device_settings_flags_win_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    for key in ("DEVICE", "DTYPE", "VRAM", "LORA_ORIGINALS"):
        monkeypatch.delenv(f"LORAKIT_{key}", raising=False)
    cfg = tmp_path / "lorakit.toml"
    cfg.write_text('device = "cuda:1"\ndtype = "bf16"\nvram = "low"\nlora_originals = "host"\n')
    s = load_settings(str(cfg))
    assert (s.device, s.dtype, s.vram, s.lora_originals) == ("cuda:1", "bf16", "low", "host")
    monkeypatch.setenv("LORAKIT_DTYPE", "FP32")
    monkeypatch.setenv("LORAKIT_DEVICE", "cpu")
    s = load_settings(str(cfg))
    flags = SimpleNamespace(device=None, dtype=None, vram="normal", lora_originals=None)
    assert s.device_options(flags) == {"device": "cpu", "dtype": "fp32", "vram": "normal", "lora_originals": "host"}
    monkeypatch.setattr("lorakit.settings.SEARCH", (tmp_path / "absent.toml",))
    assert load_settings().device_options() == {"device": "cpu", "dtype": "fp32"}  # the environment alone


@pytest.mark.parametrize("text, env, msg", [
    ('dtype = "fp8"\n', {}, r"x.toml: dtype must be one of auto, fp16, bf16, fp32, got 'fp8'"),
    ('vram = 3\n', {}, r"x.toml: vram must be a string, got 3"),
    ("", {"LORAKIT_LORA_ORIGINALS": "gpu"}, r"\$LORAKIT_LORA_ORIGINALS must be one of auto, device, host"),
])
def test_bad_device_settings_name_their_source(text: str, env: dict[str, str], msg: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "x.toml").write_text(text)
    with pytest.raises(lorakit.LorakitError, match=msg):
        load_settings(str(tmp_path / "x.toml"))


def test_generate_takes_the_device_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("LORAKIT_DEVICE", "cuda")
    assert main(["generate", "a cat", "-o", str(tmp_path / "x.png")]) == 2
    assert "device cuda is not available" in capsys.readouterr().err
    assert main(["generate", "a cat", "--device", "cpu", "--steps", "1", "-W", "64", "-H", "64",
                 "-o", str(tmp_path / "x.png")]) == 0  # the flag wins
