"""Fuzzing the HTTP API in-process (FastAPI's TestClient on the demo model): malformed JSON, odd values in every
txt2img field (NaN, 1e400, huge integers, lone surrogates, wrong types, hostile prompts), raw bytes on every POST
endpoint, random options. Every response is 2xx or 4xx — never a 5xx — and after a failed request the model's
weights are bit-identical to the pristine ones (each case starts from a restored model).

A fast subset (fixed examples) runs in the normal suite; ``--fuzz`` / ``-m fuzz`` runs ``FULL`` cases per target.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.library import Library
from lorakit.models.loading import demo_model
from lorakit.server import create_app

from .conftest import assert_original, snapshot
from .servers import demo_lora_folder
from .test_fuzz_prompt import PROMPTS

FAST, FULL = 60, 10_000
VALID = {"prompt": "a", "steps": 1, "width": 64, "height": 64, "cfg_scale": 1.0, "sampler_name": "Euler",
         "send_images": False}


class Served:
    def __init__(self, client: TestClient, app: Any, pristine: dict[str, torch.Tensor]) -> None:
        self.client, self.state, self.pristine = client, app.state.lorakit, pristine

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        pipe = self.state.model.pipe
        return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> Any:
        self.state.queue.generator.close()  # each case starts from the original weights
        r = self.client.post(path, content=body, headers={"Content-Type": content_type})
        assert r.status_code < 500, (path, body[:300], r.status_code, r.text[:500])
        if r.headers.get("content-type", "").startswith("application/json"):
            r.json()  # parseable: no NaN, no broken text
        if r.status_code >= 400:
            assert_original(self.components, self.pristine)
        return r


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = demo_lora_folder(tmp_path_factory.mktemp("fuzz") / "loras")
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")  # truncated
    model = demo_model()
    app = create_app(model, Library([folder], index=folder.parent / "index.sqlite3"))
    pristine = snapshot({"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder})
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Served(client, app, pristine)


def run(check: Any, strategy: st.SearchStrategy[Any], cases: int) -> None:
    options = settings(max_examples=cases, deadline=None, database=None, derandomize=cases == FAST,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                              HealthCheck.data_too_large])
    options(given(strategy)(check))()


# --- bodies --------------------------------------------------------------------------------------------------------

RAW = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000, "1e-400", "-0.0", "[" * 50 + "]" * 50,
       '"\\ud800"', '"\\udfff x"', '"a\\u0000b"', "18446744073709551616", "-2", "true", "null"]
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2 ** 70), 2 ** 70), st.floats(),
                    st.text(max_size=20), SURROGATES, st.sampled_from(RAW).map(lambda t: Raw(t)))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
LORA_PROMPTS = st.builds(lambda name, w: f"a <lora:{name}:{w}>",
                         st.sampled_from(["demo_style", "loha_style", "chars/unet_only", "ink_sketch_sd15", "broken",
                                          "missing", "../demo_style", "/etc/passwd", "DEMO_STYLE"]),
                         st.sampled_from(["1", "0.5", "-1", "nan", "1e400", "te=0@0,1@1", "1:1:4", "lbw=OUTD", "²"]))
SMALL = {  # valid but cheap values, or the edges just outside
    "steps": st.sampled_from([1, 2, 0, 151, -1, 1.5, "2", True]), "width": st.sampled_from([64, 72, 63, 0, 4096]),
    "height": st.sampled_from([64, 56, 2049]), "batch_size": st.sampled_from([1, 2, 0, 17, 8]),
    "n_iter": st.sampled_from([1, 2, 0, 9]), "cfg_scale": st.sampled_from([1.0, 0.0, -1.0, 31.0, 1e308]),
    "seed": st.sampled_from([-1, 0, 2 ** 32, 2 ** 64 - 1, 2 ** 64, -2]),
    "sampler_name": st.sampled_from(["Euler", "DPM++ 2M", "LCM", "nope", ""]),
    "scheduler": st.sampled_from(["Karras", "automatic", "x"]),
    "override_settings": st.dictionaries(st.sampled_from(["CLIP_stop_at_last_layers", "samples_format",
                                                          "lorakit_auto_trigger_words", "other"]),
                                         st.one_of(st.sampled_from([1, 2, 3, 0, 12, "abc", True, None]), JSON),
                                         max_size=2),
}
FIELDS = st.sampled_from(sorted(SMALL) + ["prompt", "negative_prompt", "styles", "send_images",
                                         "lorakit_auto_trigger_words", "sampler_index", "unknown_field"])


class Raw:
    """A JSON token json.dumps cannot write (``1e400``, a 5,000-digit integer), spliced in after dumping."""

    def __init__(self, token: str) -> None:
        self.token = token


def dumps(value: Any) -> bytes:
    raws: list[str] = []

    def default(o: Any) -> Any:
        raws.append(o.token)
        return f"@@raw{len(raws) - 1}@@"

    text = json.dumps(value, default=default, allow_nan=True)  # NaN, Infinity as JS writes them
    for i, token in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', token, 1)
    return text.encode("ascii")  # lone surrogates are \ud800 escapes


@st.composite
def txt2img_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid cheap request with a hostile prompt, one sampling field replaced (by an edge value or anything JSON)
    and maybe one more field of any kind: ~1 in 8 is valid and generates (64×64, 1–2 steps)."""
    body: dict[str, Any] = dict(VALID)
    body["prompt"] = draw(st.one_of(st.just("a cabin"), LORA_PROMPTS, PROMPTS, st.text(max_size=30)))
    field = draw(st.sampled_from(sorted(SMALL)))
    body[field] = draw(st.one_of(SMALL[field], JSON))
    if draw(st.booleans()):
        other = draw(FIELDS)
        body[other] = draw(st.one_of(SMALL.get(other, st.one_of(PROMPTS, LORA_PROMPTS)), JSON, SURROGATES))
    return body


def check_txt2img(served: Served) -> Any:
    def check(body: dict[str, Any]) -> None:
        served.post("/sdapi/v1/txt2img", dumps(body))

    return check


def test_txt2img_fields_fast(served: Served) -> None:
    run(check_txt2img(served), txt2img_bodies(), FAST)


@pytest.mark.fuzz
def test_txt2img_fields_fuzz(served: Served) -> None:
    run(check_txt2img(served), txt2img_bodies(), FULL)


def _png(size: tuple[int, int], mode: str = "RGB") -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGES = st.sampled_from([_png((64, 64)), _png((8, 200)), _png((1, 1)), _png((64, 64), "L"), _png((30, 30), "RGBA"),
                          "data:image/png;base64," + _png((64, 64)), "data:image/png," + _png((4, 4)), "", "AAAA",
                          "not base64!", "http://example.com/x.png", "iVBORw0KGgo=", _png((64, 64))[:-20]])
IMG2IMG = {
    "init_images": st.one_of(st.lists(IMAGES, max_size=3), JSON), "mask": st.one_of(st.none(), IMAGES, JSON),
    "denoising_strength": st.sampled_from([0.0, 0.01, 0.5, 1.0, -0.1, 1.5, 1e400, "x"]),
    "resize_mode": st.sampled_from([0, 1, 2, 3, 4, -1, "1"]), "mask_blur": st.sampled_from([0, 4, 64, 65, -1, None]),
    "inpainting_fill": st.sampled_from([0, 1, 2, 3, 4]), "inpaint_full_res": st.booleans(),
    "inpaint_full_res_padding": st.sampled_from([0, 32, 256, 257, -5]), "inpainting_mask_invert": st.sampled_from([0, 1, 2]),
}


@st.composite
def img2img_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid cheap img2img request (64 px, 1 step) with hostile images, masks and img2img fields."""
    body: dict[str, Any] = {**VALID, "init_images": [_png((64, 64))]}
    for field in draw(st.lists(st.sampled_from(sorted(IMG2IMG)), min_size=1, max_size=3, unique=True)):
        body[field] = draw(IMG2IMG[field])
    return body


def check_img2img(served: Served) -> Any:
    def check(body: dict[str, Any]) -> None:
        served.post("/sdapi/v1/img2img", dumps(body))

    return check


def test_img2img_fields_fast(served: Served) -> None:
    run(check_img2img(served), img2img_bodies(), FAST)


@pytest.mark.fuzz
def test_img2img_fields_fuzz(served: Served) -> None:
    run(check_img2img(served), img2img_bodies(), FULL)


# --- raw bytes on every POST endpoint, and options -----------------------------------------------------------------

POSTS = ["/sdapi/v1/options", "/sdapi/v1/refresh-loras", "/lorakit/v1/refresh", "/sdapi/v1/png-info",
         "/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/img2img"]
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x+json", ""])


def mutated(body: bytes) -> st.SearchStrategy[bytes]:
    """``body`` with a few bytes cut at one place and a hostile token (or nothing) put there."""
    tokens = [t.encode() for t in RAW] + [b"\xff", b"\xc3", b"{", b"]", b'"', b"\\", b",", b""]
    return st.builds(lambda at, cut, insert: body[:at] + insert + body[at + cut:], st.integers(0, len(body)),
                     st.integers(0, 5), st.sampled_from(tokens))


def without_defaults(value: Any) -> bytes:
    """An object posted to txt2img gets ``steps: 0``: the defaults (20 steps, 512×512) would cost seconds a case;
    the txt2img target above covers valid requests."""
    return dumps({**value, "steps": 0} if isinstance(value, dict) else value)


# txt2img: a cheap request cut and spliced (steps 0, so a mutation rarely makes it valid), bytes, JSON of any shape
RAW_BODIES = st.one_of(
    st.tuples(st.just("/sdapi/v1/txt2img"), st.one_of(st.binary(max_size=200), mutated(dumps({**VALID, "steps": 0})),
                                                       JSON.map(without_defaults)), CONTENT_TYPES),
    st.tuples(st.sampled_from(POSTS), st.one_of(st.binary(max_size=200), mutated(b'{"CLIP_stop_at_last_layers": 2}'),
                                                JSON.map(dumps)), CONTENT_TYPES),
)


def check_raw(served: Served) -> Any:
    def check(case: tuple[str, bytes, str]) -> None:
        served.post(*case)

    return check


def test_raw_bodies_fast(served: Served) -> None:
    run(check_raw(served), RAW_BODIES, FAST)


@pytest.mark.fuzz
def test_raw_bodies_fuzz(served: Served) -> None:
    run(check_raw(served), RAW_BODIES, FULL)


SEGMENTS = st.one_of(st.text(max_size=12).map(lambda s: quote(s, safe="")),
                     st.sampled_from(["..", "%2e%2e", "%00", "%ff", "%ud800", "..%2f..", "etc/passwd", "index.html",
                                      "app.js", ""]))
GETS = st.one_of(
    st.builds(lambda base, search: ("/lorakit/v1/loras", {"base": base, "search": search}), SEGMENTS, SEGMENTS),
    st.builds(lambda entry: (f"/lorakit/v1/loras/{entry}/preview", {}), SEGMENTS),
    st.builds(lambda path: (f"/static/{path}", {}), st.lists(SEGMENTS, max_size=4).map("/".join)),
    st.sampled_from([("/sdapi/v1/progress", {}), ("/sdapi/v1/loras", {}), ("/sdapi/v1/options", {}),
                     ("/", {}), ("/favicon.ico", {})]),
)


def check_get(served: Served) -> Any:
    def check(case: tuple[str, dict[str, str]]) -> None:
        r = served.client.get(case[0], params=case[1])
        assert r.status_code < 500, (case, r.status_code, r.text[:300])
        if "passwd" in case[0]:
            assert "root:" not in r.text

    return check


def test_get_paths_and_queries_fast(served: Served) -> None:
    run(check_get(served), GETS, FAST)


@pytest.mark.fuzz
def test_get_paths_and_queries_fuzz(served: Served) -> None:
    run(check_get(served), GETS, FULL)


OPTIONS = st.dictionaries(st.sampled_from(["CLIP_stop_at_last_layers", "lorakit_auto_trigger_words",
                                           "samples_format", "sd_model_checkpoint", "sd_checkpoint_hash", "x"]),
                          st.one_of(st.sampled_from([1, 2, 3, 9, 0, -1, 10 ** 6, 2.0, "2", "abc", True, None, "demo"]),
                                    JSON), max_size=3)


def check_options(served: Served) -> Any:
    """Whatever is posted, the stored options stay valid: nothing can poison later requests."""
    def check(values: dict[str, Any]) -> None:
        served.post("/sdapi/v1/options", dumps(values))
        options = served.client.get("/sdapi/v1/options").json()
        skip = options["CLIP_stop_at_last_layers"]
        assert type(skip) is int and 1 <= skip <= served.state.clip_layers, options
        assert type(options["lorakit_auto_trigger_words"]) is bool, options
        assert set(options) == {"sd_model_checkpoint", "sd_checkpoint_hash", "CLIP_stop_at_last_layers",
                                "samples_format", "lorakit_auto_trigger_words"}

    return check


def test_options_fast(served: Served) -> None:
    run(check_options(served), OPTIONS, FAST)


@pytest.mark.fuzz
def test_options_fuzz(served: Served) -> None:
    run(check_options(served), OPTIONS, FULL)


def test_a_valid_request_still_generates_after_the_fuzz(served: Served) -> None:
    served.client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1, "lorakit_auto_trigger_words": False})
    r = served.client.post("/sdapi/v1/txt2img", json={**VALID, "prompt": "a <lora:demo_style:1>", "send_images": True})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
