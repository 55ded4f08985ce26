"""``lorakit serve``: the A1111 API driven by the unchanged ``webuiapi`` client, concurrency without cross-talk,
failed requests leave the weights original, safety (auth, names, limits, malformed bodies)."""
from __future__ import annotations

import base64
import io
import logging
import os
import re
import socket
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from lorakit.library import Library
from lorakit.models.loading import demo_model
from lorakit.server import create_app

from .conftest import assert_original, snapshot
from .servers import demo_lora_folder, running

SMALL = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 5.0, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    folder = demo_lora_folder(tmp_path_factory.mktemp("srv") / "loras")
    model = demo_model()
    app = create_app(model, Library([folder], index=folder.parent / "index.sqlite3"))
    pristine = snapshot({"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder})
    with running(app) as url:
        yield url, (app.state.lorakit, pristine)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _post(url: str, body: dict[str, Any], **kw: Any) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120, **kw)


def test_webuiapi_client_unchanged(server: tuple[str, Any]) -> None:
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)
    models = api.get_sd_models()
    assert models[0]["model_name"] == "demo" and api.util_get_current_model() == models[0]["title"]
    api.util_set_model("demo")
    assert "DPM++ 2M Karras" in api.util_get_sampler_names()
    loras = {entry["name"]: entry for entry in api.get_loras()}
    assert set(loras) == {"demo_style", "ink_sketch_sd15", "loha_style", "unet_only"}
    assert loras["ink_sketch_sd15"]["alias"] == "ink_sketch"
    assert loras["ink_sketch_sd15"]["metadata"]["ss_network_dim"] == "2"
    result = api.txt2img(prompt="a cabin <lora:demo_style:0.8>", negative_prompt="blurry <lora:loha_style:0.3>",
                         seed=11, width=64, height=64, batch_size=2, n_iter=2, cfg_scale=6)
    assert len(result.images) == 4 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [11, 12, 13, 14]
    assert 'Lora hashes: "demo_style: 24763f94e151, loha_style:' in result.info["infotexts"][0]
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    assert result.parameters["prompt"] == "a cabin <lora:demo_style:0.8>"
    options = api.get_options()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["state"]["sampling_steps"] == 4


def test_endpoints_a1111_shapes(server: tuple[str, Any]) -> None:
    url, _ = server
    assert requests.post(f"{url}/sdapi/v1/refresh-loras", timeout=30).json() is None
    samplers = requests.get(f"{url}/sdapi/v1/samplers", timeout=30).json()
    assert {"name", "aliases", "options"} <= set(samplers[0])
    r = requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl_base.safetensors"}, timeout=30)
    assert r.status_code == 422 and "not found" in r.json()["detail"]
    assert requests.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}, timeout=30).ok
    r = _post(url, {"prompt": "a cat", **SMALL, "seed": 3, "some_future_field": {"x": 1}, "restore_faces": True})
    assert r.ok, r.text
    assert "Clip skip: 2" in r.json()["info"]
    requests.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}, timeout=30)


def _alone_then_together(url: str, bodies: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    alone = [_post(url, b).json()["images"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: _post(url, b).json()["images"], bodies))
    return alone, together


def test_concurrent_requests_see_exactly_their_own_loras(server: tuple[str, Any]) -> None:
    url, _ = server
    sets = ["", "<lora:demo_style:1>", "<lora:loha_style:0.7>", "<lora:demo_style:0.5> <lora:chars/unet_only:1>",
            "<lora:unet_only:1.2>", "<lora:loha_style:1> <lora:demo_style:-0.4>"]
    bodies = [{"prompt": f"a house {tags}", **SMALL, "seed": 100 + i} for i, tags in enumerate(sets * 2)]
    alone, together = _alone_then_together(url, bodies)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert np.array_equal(_pixels(a[0]), _pixels(t[0])), f"request {i} ({bodies[i]['prompt']}) differs"
    distinct = {_pixels(a[0]).tobytes() for a in alone[:len(sets)]}
    assert len(distinct) == len(sets), "different LoRA sets must give different images"


def test_failed_request_leaves_weights_original(server: tuple[str, Any]) -> None:
    url, (state, pristine) = server
    comps = {"unet": state.model.pipe.unet, "text_encoder": state.model.pipe.text_encoder}
    assert _post(url, {"prompt": "x <lora:demo_style:1>", **SMALL}).ok  # weights now patched
    r = _post(url, {"prompt": "x <lora:demo_style:1> <lora:ink_sketch_sd15:1>", **SMALL})
    assert r.status_code == 422 and r.json()["error"] == "IncompatibleLora"
    assert "ink_sketch_sd15" in r.json()["detail"]
    assert_original(comps, pristine)
    generator = state.queue.generator
    original_sample = generator._sample

    def broken(*args: Any, **kw: Any) -> Any:  # fails mid-generation, LoRAs applied
        raise RuntimeError("out of memory (simulated)")

    generator._sample = broken
    try:
        assert _post(url, {"prompt": "x <lora:loha_style:1>", **SMALL}).status_code == 500
    finally:
        generator._sample = original_sample
    assert_original(comps, pristine)
    assert _post(url, {"prompt": "x <lora:loha_style:1>", **SMALL}).ok


def test_progress_reports_the_running_job(server: tuple[str, Any]) -> None:
    url, _ = server
    seen: list[dict[str, Any]] = []
    thread = threading.Thread(target=lambda: _post(url, {"prompt": "slow", **SMALL, "steps": 60, "width": 128,
                                                         "height": 128}))
    thread.start()
    while thread.is_alive():
        seen.append(requests.get(f"{url}/sdapi/v1/progress", timeout=30).json())
        time.sleep(0.02)
    running = [p for p in seen if p["state"]["job_count"] == 1 and 0 < p["progress"] < 1]
    assert running, "no progress seen while generating"
    assert running[-1]["state"]["sampling_steps"] == 60


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "width": 63}, "width"), ({"prompt": "a", "steps": 500}, "steps"),
    ({"prompt": "a", "batch_size": 64}, "batch_size"), ({"prompt": "a", "width": "wide"}, "width"),
    ({"prompt": "a", "batch_size": 8, "n_iter": 4}, "batch_size"),
])
def test_limits_are_422_with_the_field(server: tuple[str, Any], body: dict[str, Any], field: str) -> None:
    r = _post(server[0], body)
    assert r.status_code == 422 and field in r.text


BODY = '{"prompt": "a", "steps": 2, "width": 64, "height": 64, %s}'


@pytest.mark.parametrize("field, where", [
    ('"cfg_scale": NaN', ["body", "cfg_scale"]), ('"cfg_scale": Infinity', ["body", "cfg_scale"]),
    ('"steps": -Infinity', ["body", "steps"]), ('"cfg_scale": 1e400', ["body", "cfg_scale"]),
    ('"some_future_field": {"x": [1, NaN]}', ["body", "some_future_field", "x", 1]),
    ('"override_settings": {"x": 1e999}', ["body", "override_settings", "x"]),
    ('"negative_prompt": "bad \\udc80 text"', ["body", "negative_prompt"]),
    ('"styles": ["\\ud800"]', ["body", "styles", 0]),
    ('"seed": 18446744073709551616', ["body", "seed"]), ('"seed": -2', ["body", "seed"]),
    ('"seed": ' + "7" * 5000, ["body", "seed"]),
    ('"override_settings": {"CLIP_stop_at_last_layers": "abc"}', ["body", "override_settings",
                                                                   "CLIP_stop_at_last_layers"]),
    ('"override_settings": {"CLIP_stop_at_last_layers": 1000}', ["body", "override_settings",
                                                                  "CLIP_stop_at_last_layers"]),
    ('"override_settings": {"CLIP_stop_at_last_layers": true}', ["body", "override_settings",
                                                                  "CLIP_stop_at_last_layers"]),
    ('"x": ' + "[" * 100 + "]" * 100, ["body", "x"] + [0] * 63),
])
def test_odd_json_values_are_422_naming_the_field(server: tuple[str, Any], field: str, where: list[Any]) -> None:
    """Python's json reads NaN, Infinity, 1e400 and lone surrogates; each used to end in a 500."""
    r = requests.post(f"{server[0]}/sdapi/v1/txt2img", data=(BODY % field).encode(), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == where, r.text


def test_lone_surrogate_in_the_prompt_is_422(server: tuple[str, Any]) -> None:
    r = requests.post(f"{server[0]}/sdapi/v1/txt2img", data=b'{"prompt": "a \\ud800 <lora:demo_style:1>"}',
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert "lone surrogate" in r.json()["detail"][0]["msg"]
    r = requests.post(f"{server[0]}/sdapi/v1/txt2img", data=b'{"prompt": "\xff"}', timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "UTF-8" in r.text


def test_options_are_checked_and_cannot_poison_later_requests(server: tuple[str, Any]) -> None:
    url, (state, _) = server
    before = requests.get(f"{url}/sdapi/v1/options", timeout=30).json()
    for bad in ("abc", 9, 10 ** 6, 0, -1, 1.5, True, None, [2]):
        r = requests.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": bad}, timeout=30)
        assert r.status_code == 422, bad
        assert r.json()["detail"][0]["loc"] == ["body", "CLIP_stop_at_last_layers"]
        assert f"from 1 to {state.clip_layers}" in r.json()["detail"][0]["msg"]
    r = requests.post(f"{url}/sdapi/v1/options", json={"lorakit_auto_trigger_words": "maybe"}, timeout=30)
    assert r.status_code == 422 and "true or false" in r.text
    # a bad value among good ones changes nothing
    r = requests.post(f"{url}/sdapi/v1/options", json={"samples_format": "jpg", "CLIP_stop_at_last_layers": "x"},
                      timeout=30)
    assert r.status_code == 422
    # unknown keys: accepted and ignored, as A1111 does
    assert requests.post(f"{url}/sdapi/v1/options", json={"show_progress_every_n_steps": 5}, timeout=30).ok
    assert requests.get(f"{url}/sdapi/v1/options", timeout=30).json() == before
    assert _post(url, {"prompt": "a cat", **SMALL}).ok


def test_prompt_length_is_capped(server: tuple[str, Any]) -> None:
    """20,000 characters a prompt: a 120k-character BREAK prompt or a 10M-character one must not hold the only
    worker (they did for > 60 s); the 422 names the field and the limit and does not echo the prompt."""
    url = server[0]
    assert _post(url, {"prompt": "a, " * 6666, **SMALL}).ok  # 19,998 characters
    for field, text in (("prompt", "BREAK " * 20_000), ("negative_prompt", "x" * 20_001), ("prompt", "a" * 10 ** 7)):
        start = time.perf_counter()
        r = _post(url, {field: text, **SMALL} if field == "prompt" else {"prompt": "a", field: text, **SMALL})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field]
        assert "at most 20000 characters" in r.json()["detail"][0]["msg"]
        assert len(r.content) < 2000 and time.perf_counter() - start < 30


def test_malformed_tag_is_refused_before_queueing(server: tuple[str, Any]) -> None:
    r = _post(server[0], {"prompt": "a <lora:demo_style:nan>", **SMALL})
    assert r.status_code == 422 and r.json()["error"] == "PromptSyntaxError" and "column 20" in r.json()["detail"]


def test_refresh_counts_are_whole_numbers_and_favicon(server: tuple[str, Any]) -> None:
    counts = requests.post(f"{server[0]}/lorakit/v1/refresh", timeout=30).json()
    assert counts["files"] == 4 and all(type(counts[k]) is int for k in ("files", "parsed", "sidecars", "removed"))
    assert isinstance(counts["seconds"], float)
    icon = requests.get(f"{server[0]}/favicon.ico", timeout=30)
    assert icon.ok and icon.headers["content-type"].startswith("image/svg+xml")


def test_one_log_line_per_request(server: tuple[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lorakit.server"):
        assert _post(server[0], {"prompt": "a <lora:demo_style:0.5>", "negative_prompt": "<lora:loha_style:1>",
                                 **SMALL}).ok
        requests.get(f"{server[0]}/sdapi/v1/options", timeout=30)
        requests.get(f"{server[0]}/sdapi/v1/progress", timeout=30)  # a poll: not logged
        _post(server[0], {"prompt": "a", "width": 63})
        ours = ("/sdapi/v1/txt2img", "/sdapi/v1/options", "/sdapi/v1/progress")
        deadline = time.time() + 10  # a line is written once the response is sent: the client may be first
        while True:
            lines = [r.getMessage() for r in caplog.records
                     if r.name == "lorakit.server" and r.getMessage().split()[1] in ours]
            if len(lines) >= 3 or time.time() > deadline:
                break
            time.sleep(0.05)
    assert len(lines) == 3, lines
    assert re.fullmatch(r"POST /sdapi/v1/txt2img 200 \d+\.\d\d s LoRAs: demo_style, loha_style", lines[0])
    assert re.fullmatch(r"GET /sdapi/v1/options 200 \d+\.\d\d s", lines[1])
    assert lines[2].startswith("POST /sdapi/v1/txt2img 422 ")


def test_malformed_json_is_422(server: tuple[str, Any]) -> None:
    for raw in ("{bad json", "[1, 2]", ""):
        r = requests.post(f"{server[0]}/sdapi/v1/txt2img", data=raw, timeout=30,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 422, raw


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..\\\\loras\\\\demo_style", "chars/../../x"])
def test_names_cannot_escape_the_library(server: tuple[str, Any], name: str) -> None:
    r = _post(server[0], {"prompt": f"a <lora:{name}:1>", **SMALL})
    assert r.status_code == 422 and r.json()["error"] == "LoraNameError"


def test_library_endpoint_dims_other_bases_with_reason(server: tuple[str, Any]) -> None:
    data = requests.get(f"{server[0]}/lorakit/v1/loras", timeout=30).json()
    by_name = {e["name"]: e for e in data["loras"]}
    assert len(by_name) == 4  # nothing hidden
    assert not by_name["ink_sketch_sd15"]["compatible"]
    assert "Stable Diffusion 1.x" in by_name["ink_sketch_sd15"]["reason"]
    assert by_name["demo_style"]["compatible"] and by_name["demo_style"]["reason"] is None
    unet_only = by_name["unet_only"]
    assert unet_only["preferred_weight"] == 0.6 and unet_only["trigger_words"][0] == "unetword"
    png = requests.get(server[0] + unet_only["preview_url"], timeout=30)
    assert png.ok and png.content.startswith(b"\x89PNG")
    filtered = requests.get(f"{server[0]}/lorakit/v1/loras", params={"base": "sd1"}, timeout=30).json()["loras"]
    assert [e["name"] for e in filtered] == ["ink_sketch_sd15"]


def test_library_list_is_cached_until_a_scan_or_an_option_changes(tmp_path: Path) -> None:
    folder = demo_lora_folder(tmp_path / "loras")
    app = create_app(demo_model(), Library([folder], index=tmp_path / "index.sqlite3"))
    with running(app) as url:
        get = lambda: requests.get(f"{url}/lorakit/v1/loras", timeout=30).json()
        first = get()
        assert first == get() and first["auto_trigger_words"] is False
        shutil.copy(folder / "demo_style.safetensors", folder / "added_later.safetensors")
        assert requests.post(f"{url}/lorakit/v1/refresh", timeout=30).ok
        assert "added_later" in {e["name"] for e in get()["loras"]}, "a scan makes a new list"
        assert requests.post(f"{url}/sdapi/v1/options", json={"lorakit_auto_trigger_words": True}, timeout=30).ok
        assert get()["auto_trigger_words"] is True
        only = requests.get(f"{url}/lorakit/v1/loras", params={"search": "added"}, timeout=30).json()["loras"]
        assert [e["name"] for e in only] == ["added_later"]


def test_auto_trigger_words_once(server: tuple[str, Any]) -> None:
    r = _post(server[0], {"prompt": "a lohaword house <lora:loha_style:1> <lora:unet_only:1>", **SMALL,
                          "lorakit_auto_trigger_words": True})
    info = r.json()["info"]
    assert '"prompt": "a lohaword house <lora:loha_style:1> <lora:unet_only:1>, unetword"' in info


def test_api_auth(tmp_path: Path) -> None:
    folder = demo_lora_folder(tmp_path / "loras")
    app = create_app(demo_model(), Library([folder], index=tmp_path / "i.sqlite3"), api_auth="ann:s3cret")
    with running(app) as url:
        assert requests.get(f"{url}/sdapi/v1/sd-models", timeout=30).status_code == 401
        assert requests.get(f"{url}/", timeout=30).status_code == 401
        assert requests.get(f"{url}/sdapi/v1/sd-models", auth=("ann", "wrong"), timeout=30).status_code == 401
        api = webuiapi.WebUIApi(port=int(url.rsplit(":", 1)[1]), username="ann", password="s3cret")
        assert api.get_sd_models()[0]["model_name"] == "demo"
        assert len(api.txt2img(prompt="a <lora:demo_style:1>", steps=2, width=64, height=64).images) == 1


def test_lorakit_serve_command_with_webuiapi(tmp_path: Path) -> None:
    """The real command, as a user starts it: embedded demo model, a LoRA folder, localhost."""
    import subprocess
    import sys

    from .servers import free_port

    port = free_port()
    env = {**os.environ, "LORAKIT_LORA_DIRS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--lora-dir",
                             str(Path(__file__).resolve().parents[1] / "examples" / "loras"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.time() < deadline, "lorakit serve did not start"
                time.sleep(0.5)
        api = webuiapi.WebUIApi(port=port)
        result = api.txt2img(prompt="a cabin <lora:demo_style:0.7>", seed=2, steps=3, width=64, height=64)
        assert result.images[0].size == (64, 64) and "demo_style: 24763f94e151" in result.info["infotexts"][0]
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=30).text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/" in out
    # one line per request by default (no -v): method, path, status, time, and the LoRAs of a txt2img
    assert re.search(r"^POST /sdapi/v1/txt2img 200 \d+\.\d\d s LoRAs: demo_style$", out, re.M), out


def test_lorakit_serve_port_in_use_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "serve", "--port", str(port)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "LORAKIT_LORA_DIRS": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lorakit serve: port {port} is in use" and "serving" not in proc.stdout
