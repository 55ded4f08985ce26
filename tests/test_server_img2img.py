"""``/sdapi/v1/img2img`` (with the mask fields A1111 names) and ``/interrupt`` / ``/skip``, driven by the unchanged
``webuiapi`` client where it has the call; errors are lorakit's 422 naming the field."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
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

SMALL: dict[str, Any] = {"steps": 6, "width": 64, "height": 64, "cfg_scale": 5.0, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    folder = demo_lora_folder(tmp_path_factory.mktemp("i2i-srv") / "loras")
    model = demo_model()
    app = create_app(model, Library([folder], index=folder.parent / "index.sqlite3"))
    pristine = snapshot({"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder})
    with running(app) as url:
        yield url, (app.state.lorakit, pristine)


def _api(url: str) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), sampler="Euler", steps=6)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _init() -> Image.Image:
    image = Image.new("RGB", (96, 64), (30, 60, 200))
    image.paste((250, 250, 250), (40, 16, 72, 48))
    return image


def test_webuiapi_img2img_and_inpainting(server: tuple[str, Any]) -> None:
    url, _ = server
    api = _api(url)
    r = api.img2img(images=[_init()], prompt="a red circle <lora:demo_style:0.8>", seed=7, denoising_strength=0.6,
                    width=64, height=64, cfg_scale=5, resize_mode=1)
    assert len(r.images) == 1 and r.images[0].size == (64, 64)
    assert r.info["denoising_strength"] == 0.6 and r.info["all_seeds"] == [7]
    assert "Denoising strength: 0.6" in r.info["infotexts"][0] and "demo_style" in r.info["infotexts"][0]
    assert r.parameters["init_images"] is None, "init images are not echoed unless include_init_images"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    base = _init().resize((64, 64))
    painted = api.img2img(images=[base], mask_image=mask, prompt="a green star", seed=7, denoising_strength=0.9,
                          width=64, height=64, cfg_scale=5, mask_blur=2, inpainting_fill=1, inpaint_full_res=False)
    out = np.asarray(painted.images[0].convert("RGB"), dtype=np.int16)
    assert np.array_equal(out[:, :26], np.asarray(base, dtype=np.int16)[:, :26]), "outside the mask: the original"
    only = api.img2img(images=[base], mask_image=mask, prompt="a green star", seed=7, width=64, height=64,
                       cfg_scale=5)  # webuiapi's defaults: only masked, padding 0, fill
    assert only.images[0].size == (64, 64) and "Inpaint area: Only masked" in only.info["infotexts"][0]


def test_img2img_rejects_bad_images_naming_the_field(server: tuple[str, Any]) -> None:
    url, _ = server
    post = lambda body: requests.post(f"{url}/sdapi/v1/img2img", json={**SMALL, **body}, timeout=60)
    r = post({"prompt": "x", "init_images": ["not base64!"]})
    assert r.status_code == 422 and r.json()["error"] == "ImageInputError" and "init_images[0]" in r.json()["detail"]
    r = post({"prompt": "x", "init_images": [base64.b64encode(b"hello").decode()]})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
    r = post({"prompt": "x", "init_images": []})
    assert r.status_code == 422 and "init_images" in r.json()["detail"]
    r = post({"prompt": "x", "init_images": [_b64(_init())], "mask": "data:image/png;base64,AAAA"})
    assert r.status_code == 422 and r.json()["detail"].startswith("mask:")
    r = post({"prompt": "x", "init_images": [_b64(_init())], "denoising_strength": 2})
    assert r.status_code == 422 and "denoising_strength" in json.dumps(r.json())
    r = post({"prompt": "x", "init_images": ["data:image/png;base64," + _b64(_init())], "inpainting_fill": 9})
    assert r.status_code == 422 and "inpainting_fill" in json.dumps(r.json())
    ok = post({"prompt": "x", "init_images": ["data:image/png;base64," + _b64(_init())]})
    assert ok.status_code == 200, ok.text


def _wait_for_step(url: str, step: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        state = requests.get(f"{url}/sdapi/v1/progress", timeout=30).json()["state"]
        if state["sampling_step"] >= step and state["job_count"] >= 1:
            return
        time.sleep(0.01)
    raise AssertionError("the job never reached the step")


def test_interrupt_returns_the_partial_image_and_restores_weights(server: tuple[str, Any]) -> None:
    url, (state, pristine) = server
    comps = {"unet": state.model.pipe.unet, "text_encoder": state.model.pipe.text_encoder}
    out: dict[str, Any] = {}
    body: dict[str, Any] = {"prompt": "slow <lora:demo_style:1>", **SMALL, "steps": 150, "width": 128, "height": 128, "n_iter": 3,
            "seed": 1}
    thread = threading.Thread(target=lambda: out.update(r=_api(url).txt2img(**{**body, "cfg_scale": 5})))
    thread.start()
    _wait_for_step(url, 2)
    assert _api(url).interrupt() == {}
    thread.join(timeout=120)
    r = out["r"]
    assert len(r.images) == 1, "an interrupted job returns what it has; the next iterations do not run"
    assert any("interrupted after step" in n for n in r.info["notes"])
    assert_original(comps, pristine)
    assert requests.get(f"{url}/sdapi/v1/progress", timeout=30).json()["state"]["interrupted"] is False
    # nothing is left over for the next job
    again = requests.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, "prompt": "x"}, timeout=60).json()
    assert not json.loads(again["info"])["notes"]


def test_skip_ends_only_the_current_iteration(server: tuple[str, Any]) -> None:
    url, _ = server
    out: dict[str, Any] = {}
    body: dict[str, Any] = {"prompt": "slow", **SMALL, "steps": 60, "n_iter": 2, "seed": 1}
    thread = threading.Thread(target=lambda: out.update(r=requests.post(f"{url}/sdapi/v1/txt2img", json=body,
                                                                         timeout=300)))
    thread.start()
    _wait_for_step(url, 2)
    assert requests.post(f"{url}/sdapi/v1/skip", timeout=30).json() == {}
    thread.join(timeout=300)
    info = json.loads(out["r"].json()["info"])
    assert len(out["r"].json()["images"]) == 2, "skip ends the current iteration; the next one runs"
    assert len([n for n in info["notes"] if "skipped after step" in n]) == 1


def test_interrupt_when_idle_does_nothing(server: tuple[str, Any]) -> None:
    url, _ = server
    assert requests.post(f"{url}/sdapi/v1/interrupt", timeout=30).json() == {}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, "prompt": "x"}, timeout=60)
    assert r.ok and not json.loads(r.json()["info"])["notes"]
