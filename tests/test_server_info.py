"""``/sdapi/v1/png-info`` and ``/sdapi/v1/embeddings`` driven by the unchanged ``webuiapi`` client, and their
refusals (raw HTTP): what is not base64, not an image, too many pixels."""
from __future__ import annotations

import base64
import io
import logging
import random
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import webuiapi
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from transformers import CLIPTextConfig, CLIPTextModel

from lorakit.files.io import save_file
from lorakit.generate.infotext_parse import lora_hashes
from lorakit.library import EmbeddingIndex, Library
from lorakit.models.loading import demo_model
from lorakit.server import create_app, images, info_routes
from lorakit.server.info_routes import embeddings_reply

from .servers import EXAMPLES, running

WIDTH = 64  # the demo model's text encoder


def _a1111_pt(path: Path, vectors: torch.Tensor, **record: Any) -> None:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, **record},
               str(path))


def _embedding_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    _a1111_pt(root / "fits.pt", torch.randn(2, WIDTH), step=100, sd_checkpoint="4b2ce7c2aa",
              sd_checkpoint_name="demo")
    save_file({"emb_params": torch.randn(3, WIDTH)}, root / "fits_st.safetensors",
              {"step": "250", "sd_checkpoint_name": "demo"})
    torch.save({"<d>": torch.randn(WIDTH)}, str(root / "diffusers_style.bin"))
    (root / "sub").mkdir()
    _a1111_pt(root / "sub" / "nested.pt", torch.randn(1, WIDTH), step="not a number")
    _a1111_pt(root / "sd15.pt", torch.randn(4, 768), step=5000, sd_checkpoint="cc6cb27103")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, root / "xl.safetensors")
    (root / "broken.pt").write_bytes(b"not a pickle at all")
    save_file({"emb_params": torch.zeros(0, WIDTH)}, root / "empty.safetensors")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("info")
    (tmp / "loras").mkdir()
    shutil.copy(EXAMPLES / "demo_style.safetensors", tmp / "loras" / "demo_style.safetensors")
    app = create_app(demo_model(), Library([tmp / "loras"], index=tmp / "index.sqlite3"),
                     EmbeddingIndex([_embedding_folder(tmp / "embeddings")]))
    with running(app) as url:
        yield url


def _api(url: str) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))


def _png_bytes(image: Image.Image, info: PngInfo | None = None, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, pnginfo=info) if info else image.save(out, format=fmt)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_info(url: str, image: str) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/png-info", json={"image": image}, timeout=60)


def test_png_info_reads_back_a_generated_image(server: str) -> None:
    api = _api(server)
    prompt = "a cabin, snow, (warm light:1.2)\nsecond line <lora:demo_style:0.8>"
    made = api.txt2img(prompt=prompt, negative_prompt="blurry, lowres", seed=5, steps=3, width=64, height=64,
                       cfg_scale=5, sampler_name="Euler")
    text = made.image.info["parameters"]
    result = api.png_info(made.image)
    assert result.info == text and result.json["items"] == {}
    p = result.parameters
    assert p["Prompt"] == prompt and p["Negative prompt"] == "blurry, lowres"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"]) == ("3", "Euler", "5", "5")
    assert (p["Size-1"], p["Size-2"], p["Clip skip"]) == ("64", "64", "1")
    assert lora_hashes(p) == {"demo_style": "24763f94e151"}
    assert p["Model"] == "demo" and p["Model hash"] == made.info["sd_model_hash"]


def test_png_info_items_are_the_other_text_chunks_wherever_they_are(server: str) -> None:
    info = PngInfo()
    info.add_text("parameters", 'x\nSteps: 7, Sampler: Euler, Seed: 1, Lora hashes: "a: 01, b: 02"')
    info.add_text("Software", "some tool")
    info.add_itxt("comment", "ünïcödé ✓")
    info.add_text("workflow", "{\"nodes\": []}" * 50, zip=True)
    raw = _png_bytes(Image.new("RGB", (16, 8), (1, 2, 3)), info)
    raw = raw[:-12] + _chunk(b"tEXt", b"late\x00after the pixels") + raw[-12:]  # before IEND
    items = {"Software": "some tool", "comment": "ünïcödé ✓", "workflow": "{\"nodes\": []}" * 50}
    result = _api(server).png_info(Image.open(io.BytesIO(raw)))  # webuiapi re-encodes the text PIL has read
    assert result.json["items"] == items  # PIL reads the late chunk only when it loads the pixels
    assert result.parameters["Steps"] == "7" and result.parameters["Lora hashes"] == "a: 01, b: 02"
    r = _png_info(server, base64.b64encode(raw).decode())  # the file itself, raw HTTP, no data URL
    assert r.status_code == 200 and r.json()["items"] == {**items, "late": "after the pixels"}
    assert r.json()["info"] == result.info


def test_png_info_without_parameters_and_other_formats(server: str) -> None:
    result = _api(server).png_info(Image.new("L", (4, 4)))
    assert result.info == "" and result.json["items"] == {}
    assert result.parameters["Prompt"] == "" and result.parameters["Clip skip"] == "1"
    jpeg = base64.b64encode(_png_bytes(Image.new("RGB", (8, 8)), fmt="JPEG")).decode()
    r = _png_info(server, f"data:image/jpeg;base64,{jpeg}")
    assert r.status_code == 200 and r.json()["info"] == "" and r.json()["items"] == {}
    wrapped = "\n".join(jpeg[i:i + 76] for i in range(0, len(jpeg), 76))  # MIME line breaks
    assert _png_info(server, wrapped).status_code == 200


def _noise_png() -> bytes:
    return _png_bytes(Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)))


def _huge_png(width: int, height: int) -> bytes:
    """A tiny file that declares ``width``×``height`` grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


@pytest.mark.parametrize("image, problem", [
    ("", "empty"),
    ("   ", "empty"),
    ("@@@ not base64 @@@", "not valid base64"),
    ("iVBORw0KGgo", "not valid base64"),  # bad padding
    ("data:image/png,iVBORw0KGgo=", "data URL must be base64"),
    ("https://example.com/cat.png", "URLs are not fetched"),
    (base64.b64encode(b"hello, not an image").decode(), "not a readable image"),
    (base64.b64encode(_noise_png()[:6000]).decode(), "not a readable image"),  # truncated
    (base64.b64encode(_huge_png(9_000, 9_000)).decode(), "megapixels allowed"),
    (base64.b64encode(_huge_png(20_000, 20_000)).decode(), "megapixels allowed"),  # past PIL's own limit
], ids=["empty", "blank", "not-base64", "bad-padding", "data-url-not-base64", "url", "not-an-image", "truncated",
        "too-many-pixels", "decompression-bomb"])
def test_png_info_refusals_are_422_naming_the_problem(server: str, image: str, problem: str) -> None:
    r = _png_info(server, image)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "ImageInputError" and problem in r.json()["detail"], r.text
    assert r.json()["detail"].startswith("image: ")


def test_png_info_body_checks(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = requests.post(f"{server}/sdapi/v1/png-info", json={}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
    r = requests.post(f"{server}/sdapi/v1/png-info", json={"image": 5}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
    monkeypatch.setattr(images, "MAX_BYTES", 3000)  # the server runs in this process
    big = base64.b64encode(bytes(9000)).decode()
    r = _png_info(server, big)
    assert r.status_code == 422 and "base64 characters is more than" in r.json()["detail"]


def test_png_info_refuses_an_overlong_infotext(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    info = PngInfo()
    info.add_text("parameters", "word " * 1000)
    monkeypatch.setattr(info_routes, "MAX_INFOTEXT_CHARS", 4000)
    r = _png_info(server, base64.b64encode(_png_bytes(Image.new("L", (2, 2)), info)).decode())
    assert r.status_code == 422 and "parameters text is 5000 characters" in r.json()["detail"]


def test_embeddings_sorted_by_fit_with_a1111_fields(server: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lorakit.server"):
        reply = _api(server).get_embeddings()
    assert reply == {
        "loaded": {
            "diffusers_style": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": WIDTH,
                                "vectors": 1},
            "fits": {"step": 100, "sd_checkpoint": "4b2ce7c2aa", "sd_checkpoint_name": "demo", "shape": WIDTH,
                     "vectors": 2},
            "fits_st": {"step": 250, "sd_checkpoint": None, "sd_checkpoint_name": "demo", "shape": WIDTH,
                        "vectors": 3},
            "nested": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": WIDTH,
                       "vectors": 1},
        },
        "skipped": {
            "sd15": {"step": 5000, "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": None, "shape": 768,
                     "vectors": 4},
            "xl": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768 + 1280,
                   "vectors": 2},
        },
    }
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 2
    assert any("broken" in m and "broken.pt" in m for m in left_out)
    assert any("empty" in m and "without vectors" in m for m in left_out)


def test_loaded_means_a_prompt_can_use_it_and_skipped_that_it_cannot(server: str) -> None:
    body: dict[str, Any] = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1}
    ok = requests.post(f"{server}/sdapi/v1/txt2img", json={**body, "prompt": "a fits cat"}, timeout=120)
    assert ok.status_code == 200, ok.text
    refused = requests.post(f"{server}/sdapi/v1/txt2img", json={**body, "prompt": "a sd15 cat"}, timeout=120)
    assert refused.status_code == 422 and "768 wide" in refused.json()["detail"]


def test_no_embedding_folder_gives_empty_lists(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    app = create_app(demo_model(), Library([tmp_path / "loras"], index=tmp_path / "index.sqlite3"))
    with running(app) as url:
        assert _api(url).get_embeddings() == {"loaded": {}, "skipped": {}}


def _encoder(width: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=1000, max_position_embeddings=77))


def test_sdxl_needs_vectors_for_both_encoders(tmp_path: Path) -> None:
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}, tmp_path / "pair.safetensors")
    save_file({"clip_l": torch.randn(2, 48), "clip_g": torch.randn(2, 32)}, tmp_path / "swapped.safetensors")
    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "sd1.safetensors")
    reply = embeddings_reply(EmbeddingIndex([tmp_path]), [(_encoder(32), None), (_encoder(48), None)])
    assert set(reply["loaded"]) == {"pair"} and set(reply["skipped"]) == {"swapped", "sd1"}
    assert reply["loaded"]["pair"]["shape"] == 80 and reply["skipped"]["sd1"]["shape"] == 32
