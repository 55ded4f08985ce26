"""Issue 21's rules on the FLUX.1 and quantized code (found by the CLI fuzz harness's ``@flux`` rows): the JSON
files of FLUX.1 folders read bounded, and training on a GGUF base."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

import lorakit
from lorakit.cli import main
from lorakit.errors import ModelError
from lorakit.models.loading import load_model

from .flux_factories import bfl_state
from .test_quant_files import write_gguf

DEEP = '{"_class_name": "FluxPipeline", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.fixture(scope="module")
def flux_copy(tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fluxcopy") / "flux"
    shutil.copytree(tiny_flux_dir, d)
    return d


def test_deep_model_index_json_of_a_flux_folder_is_a_model_error(flux_copy: Path) -> None:
    """Was a RecursionError (``is_flux_path`` and the folder reader decoded it whole, unbounded)."""
    (flux_copy / "model_index.json").rename(flux_copy / "model_index.keep")
    try:
        (flux_copy / "model_index.json").write_text(DEEP)
        with pytest.raises(ModelError, match="model_index.json: unreadable .*nest"):
            load_model(str(flux_copy), device="cpu")
    finally:
        (flux_copy / "model_index.json").unlink()
        (flux_copy / "model_index.keep").rename(flux_copy / "model_index.json")


def test_train_on_a_gguf_base(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """Was an IndexError: the network read the GGUF layers' stored bytes as their weights (their shape and, for
    DoRA, their values); it reads the logical shape and the dequantized values, as every other reader of W."""
    from tests.flux_factories import tiny_flux_transformer

    gguf = tmp_path / "flux1-tiny-Q8_0.gguf"
    write_gguf(gguf, bfl_state(tiny_flux_transformer()), "Q8_0")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 200, 30)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a green circle")
    out = tmp_path / "q.safetensors"
    rc = main(["train", str(data), "-o", str(out), "--steps", "1", "--resolution", "64", "--rank", "2",
               "--network", "dora", "--max-sequence-length", "16", "-m", str(gguf), "--components",
               str(tiny_flux_dir), "--device", "cpu"])
    assert rc == 0
    lora = lorakit.load_lora(out)
    assert lora.arch == "flux1" and any(p.endswith("img_attn.qkv") or "attn.to_q" in p for p in lora.layers)
