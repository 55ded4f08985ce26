"""Switching base models through A1111's API (``/sdapi/v1/sd-models``, ``POST /sdapi/v1/options`` with
``sd_model_checkpoint``, ``/refresh-checkpoints``) with the unchanged ``webuiapi`` client, the right errors, and
options saved and read back when the server starts again (``server.models``, ``server.state``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import webuiapi

from lorakit.library import Library
from lorakit.models.loading import demo_model
from lorakit.server import create_app
from lorakit.server.models import ModelCatalog, entry_for
from lorakit.server.state import saved_model

from .factories import tiny_sd1_pipeline
from .servers import demo_lora_folder, free_port, running


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    pipe: Any = tiny_sd1_pipeline()
    pipe.save_pretrained(root / "tiny")
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text("{not json")
    return root


def _app(tmp: Path, models: Path, options: Path) -> Any:
    folder = demo_lora_folder(tmp / "loras")
    catalog = ModelCatalog([models], entry_for(None, [models]))
    return create_app(demo_model(), Library([folder], index=tmp / "index.sqlite3"), catalog=catalog,
                      options_file=options)


def test_switch_models_with_webuiapi_and_the_choice_is_saved(tmp_path: Path, models_dir: Path) -> None:
    options = tmp_path / "opts" / "server-options.json"
    with running(_app(tmp_path, models_dir, options)) as url:
        api = webuiapi.WebUIApi(port=int(url.rsplit(":", 1)[1]))
        titles = [m["title"] for m in api.get_sd_models()]
        assert titles[0].startswith("demo [") and "tiny" in titles and "broken" in titles
        assert api.util_get_current_model().startswith("demo [")
        assert requests.get(f"{url}/lorakit/v1/model", timeout=30).json()["native_size"] == 64
        api.util_set_model("tiny")
        current = api.util_get_current_model()
        assert current.startswith("tiny [") and current in [m["title"] for m in api.get_sd_models()]
        r = api.txt2img(prompt="a cat", steps=2, width=64, height=64, seed=1)
        assert r.info["sd_model_name"] == "tiny" and r.images[0].size == (64, 64)
        api.set_options({"CLIP_stop_at_last_layers": 2})
        saved = json.loads(options.read_text())
        assert saved["sd_model_checkpoint"] == current and saved["CLIP_stop_at_last_layers"] == 2
        assert not list(options.parent.glob("*.tmp")), "written to a temporary name, then renamed"
        # the library endpoint and the page's model endpoint follow the running model (its native size too)
        assert requests.get(f"{url}/lorakit/v1/loras", timeout=30).json()["model"]["title"] == current
        model = requests.get(f"{url}/lorakit/v1/model", timeout=30).json()
        assert model["title"] == current and model["native_size"] == 512
    # a new server with the same options file: the saved model and options come back
    catalog = ModelCatalog([models_dir], entry_for(None, [models_dir]))
    entry = saved_model(options, catalog)
    assert entry is not None and entry.title == "tiny"
    catalog.current = entry
    from lorakit.models.loading import load_model

    app = create_app(load_model(entry.spec), Library([], index=tmp_path / "i2.sqlite3"), catalog=catalog,
                     options_file=options)
    with running(app) as url:
        got = requests.get(f"{url}/sdapi/v1/options", timeout=30).json()
        assert got["sd_model_checkpoint"] == current and got["CLIP_stop_at_last_layers"] == 2


def test_unknown_or_broken_model_is_a_422_and_the_running_one_stays(tmp_path: Path, models_dir: Path) -> None:
    options = tmp_path / "server-options.json"
    with running(_app(tmp_path, models_dir, options)) as url:
        post = lambda body: requests.post(f"{url}/sdapi/v1/options", json=body, timeout=120)
        r = post({"sd_model_checkpoint": "nope.safetensors [0123456789]"})
        assert r.status_code == 422 and r.json()["error"] == "ModelError"
        assert "'nope.safetensors [0123456789]' not found" in r.json()["detail"] and "'tiny'" in r.json()["detail"]
        r = post({"sd_model_checkpoint": "broken", "CLIP_stop_at_last_layers": 2})
        assert r.status_code == 422 and r.json()["error"] == "ModelError" and "broken" in r.json()["detail"]
        r = post({"sd_model_checkpoint": 5})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
        got = requests.get(f"{url}/sdapi/v1/options", timeout=30).json()
        assert got["sd_model_checkpoint"].startswith("demo [") and got["CLIP_stop_at_last_layers"] == 1
        assert not options.exists(), "a refused change saves nothing"
        ok = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x <lora:demo_style:1>", "steps": 2,
                                                            "width": 64, "height": 64}, timeout=60)
        assert ok.status_code == 200 and json.loads(ok.json()["info"])["sd_model_name"] == "demo"
        # a checkpoint added later shows after refresh-checkpoints
        (models_dir / "later.safetensors").write_bytes(b"")
        try:
            assert "later.safetensors" not in [m["title"] for m in requests.get(f"{url}/sdapi/v1/sd-models").json()]
            assert requests.post(f"{url}/sdapi/v1/refresh-checkpoints", timeout=30).ok
            assert "later.safetensors" in [m["title"] for m in requests.get(f"{url}/sdapi/v1/sd-models").json()]
        finally:
            (models_dir / "later.safetensors").unlink()


def test_unreadable_saved_options_start_with_defaults(tmp_path: Path, models_dir: Path) -> None:
    options = tmp_path / "server-options.json"
    options.write_text('{"CLIP_stop_at_last_layers": 99, "sd_model_checkpoint": "gone"}')
    catalog = ModelCatalog([models_dir], entry_for(None, [models_dir]))
    assert saved_model(options, catalog) is None
    with running(_app(tmp_path, models_dir, options)) as url:
        got = requests.get(f"{url}/sdapi/v1/options", timeout=30).json()
        assert got["CLIP_stop_at_last_layers"] == 1 and got["sd_model_checkpoint"].startswith("demo [")
    options.write_text("[1, 2")
    assert saved_model(options, catalog) is None


def test_lorakit_serve_starts_with_the_saved_model(tmp_path: Path, models_dir: Path) -> None:
    options = tmp_path / "server-options.json"
    options.write_text(json.dumps({"sd_model_checkpoint": "tiny [0123abcd99]"}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--models-dir", str(models_dir),
                             "--options-file", str(options), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "LORAKIT_LORA_DIRS": ""},
                            cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while True:
            try:
                got = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=5).json()
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.time() < deadline, "lorakit serve did not start"
                time.sleep(0.5)
        assert got["sd_model_checkpoint"].startswith("tiny [")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "model tiny on cpu" in out, out
