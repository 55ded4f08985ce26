"""``lorakit inspect``: text and the stable JSON schema, hashes checked against hashlib, exit codes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load

from lorakit.cli import main
from lorakit.files.io import save_file

from .conftest import REAL_LORAS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "loras" / "ink_sketch_sd15.safetensors"
SCHEMA_KEYS = {"schema", "file", "name", "size_bytes", "dialect", "architecture", "network_types", "rank", "ranks",
               "alpha", "alphas", "layers", "modules", "embeddings", "unrecognised_keys", "trigger_words", "hashes",
               "training", "trained_trigger_words", "training_tags"}
# added for FLUX.1 and the families not applied (the keys above are unchanged: lorakit.inspect/1 stays compatible)
ADDED_KEYS = {"family", "base", "variant", "supported", "note", "encoders", "layout", "fused_layers", "tensors"}


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["inspect", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_schema_and_values(capsys: pytest.CaptureFixture[str]) -> None:
    info = _json(capsys, str(EXAMPLE))
    assert set(info) == SCHEMA_KEYS | ADDED_KEYS and info["schema"] == "lorakit.inspect/1"
    assert (info["family"], info["base"], info["variant"], info["supported"], info["layout"]) == \
        ("Stable Diffusion", "sd1", None, True, None)
    assert info["dialect"] == "kohya" and info["architecture"] == "sd1" and info["network_types"] == ["lora"]
    assert info["rank"] == 2 and info["alpha"] == 1.0
    assert info["modules"] == {"unet": 192, "text_encoder": 72}
    assert info["trigger_words"][:3] == ["inksketch", "monochrome", "lineart"]
    assert info["training"]["network_dim"] == "2" and info["training"]["started_at"].startswith("2023-11-14")


def test_hashes_match_independent_computation(capsys: pytest.CaptureFixture[str]) -> None:
    data = EXAMPLE.read_bytes()
    n = int.from_bytes(data[:8], "little")
    full = hashlib.sha256(data).hexdigest()
    after_header = hashlib.sha256(data[8 + n:]).hexdigest()
    h = _json(capsys, str(EXAMPLE))["hashes"]
    assert h == {"sha256": full, "autov2": full[:10], "addnet": after_header, "a1111_short": after_header[:12],
                 "sshs_model_hash": None, "sshs_matches": None}


def test_sshs_model_hash_shown_and_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = st_load(str(EXAMPLE))
    p = tmp_path / "claimed.safetensors"
    save_file(sd, p, {"sshs_model_hash": "0xec44206028"})
    h = _json(capsys, str(p))["hashes"]
    assert h["sshs_model_hash"] == "0xec44206028" and h["sshs_matches"] is False
    assert main(["inspect", str(p)]) == 0
    assert "differs from the computed" in capsys.readouterr().out


def test_inspect_text_real_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(REAL_LORAS / "cloneofsimo_sd15_disney.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "cloneofsimo" in out and "Stable Diffusion 1.x" in out and "<s1> (768,)" in out


def test_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "missing.safetensors: no such file" in err


def test_inspect_reports_every_file_and_fails_at_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "torn.safetensors"
    bad.write_bytes(EXAMPLE.read_bytes()[:-100])
    demo = ROOT / "examples" / "loras" / "demo_style.safetensors"
    assert main(["inspect", str(EXAMPLE), str(bad), str(demo)]) == 2
    out, err = capsys.readouterr()
    assert "ink_sketch_sd15  (" in out and "demo_style  (" in out  # the files after the bad one are reported
    assert err.count("\n") == 1 and err.startswith("lorakit: error: ") and "torn.safetensors" in err
    assert main(["inspect", "--json", str(EXAMPLE), str(bad), str(demo)]) == 2
    infos = json.loads(capsys.readouterr().out)
    assert [i["file"] for i in infos] == [str(EXAMPLE), str(bad), str(demo)]
    assert set(infos[0]) == set(infos[2]) == SCHEMA_KEYS | ADDED_KEYS
    assert set(infos[1]) == {"schema", "file", "error"} and "torn.safetensors" in infos[1]["error"]
    assert main(["inspect", "--json", str(EXAMPLE), str(demo)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["inspect", "--json", str(bad)]) == 2  # one file: one object, or nothing but the error
    out, err = capsys.readouterr()
    assert out == "" and "torn.safetensors" in err


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", str(EXAMPLE)], capture_output=True,
                         text=True, check=True).stdout
    assert "ink_sketch_sd15" in out and "trigger words inksketch" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_save_file_roundtrip(tmp_path: Path, dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 10).to(dtype)
    save_file({"b": t, "a": torch.zeros(0)}, tmp_path / "x.safetensors", {"z": "1", "a": "2"})
    back = st_load(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["b"], t) and back["a"].numel() == 0


def test_the_command_makes_openmp_threads_wait_passively() -> None:
    """Set before torch loads (spinning OpenMP threads make training ~13× slower on a busy 2-core CPU); a value the
    user set is kept."""
    code = "import os, sys, lorakit.cli; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["PASSIVE", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.split() == ["ACTIVE", "False"], out.stderr

