"""Mixed-LoRA batches (issue 12): requests with different LoRA sets in one UNet batch, each image equal to the same
request alone in hooks mode; weights untouched; incompatible requests fall back; ``serve --max-batch`` and
``lorakit batch`` use it. On a tiny SD1-layout pipeline (64 px, 3 steps)."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests as http
import torch

from lorakit.files.io import save_file
from lorakit.generate.batched import group_jobs
from lorakit.generate.pipeline import Generator, Request, Result
from lorakit.generate.request import resolve_job
from lorakit.keymap.arch import Arch
from lorakit.library import Library
from lorakit.models.loading import BaseModel
from lorakit.patch.multi import MultiPatcher, RowMap

from .conftest import assert_original, snapshot
from .factories import make_kohya_lora, tiny_sd1_pipeline, tiny_sdxl_pipeline
from .servers import running

SMALL: dict[str, Any] = {"steps": 3, "cfg": 5.0, "sampler": "Euler a", "width": 64, "height": 64}


def tiny_sd1_model() -> BaseModel:
    pipe: Any = tiny_sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(pipe, "tiny", "0123456789", Arch.UNKNOWN)


def lora_folder(root: Path, model: BaseModel) -> Path:
    """A LoCon (UNet), a LoHa and a LoKr (UNet), an IA3 (UNet), a LoRA on the text encoder and the UNet."""
    comps = {"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder}
    root.mkdir(parents=True, exist_ok=True)

    def unet(kind: str) -> Any:
        return lambda p: kind if p.startswith("unet") else None

    for name, kind, seed in (("locon", unet("lora"), 1), ("loha", unet("loha"), 2), ("lokr", unet("lokr"), 3),
                             ("ia3", unet("ia3"), 4), ("both", "lora", 5)):
        save_file(make_kohya_lora(comps, kind, rank=4, seed=seed), root / f"{name}.safetensors", {})
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseModel, Library]:
    model = tiny_sd1_model()
    folder = lora_folder(tmp_path_factory.mktemp("mlb") / "loras", model)
    return model, Library([folder], index=folder.parent / "index.sqlite3")


def _components(model: BaseModel) -> dict[str, torch.nn.Module]:
    return {"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder, "vae": model.pipe.vae}


def _px(result: Result) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")).astype(np.int16) for image in result.images]


def max_diff(a: Result, b: Result) -> int:
    assert len(a.images) == len(b.images)
    return max(int(np.abs(x - y).max()) for x, y in zip(_px(a), _px(b)))


MIXED = [
    Request("a red circle <lora:locon:0.8>", seed=1, **SMALL),
    Request("a blue star <lora:loha:1> <lora:lokr:-0.6>", "ugly", seed=2, batch=2, **SMALL),
    Request("a green square <lora:both:0.7>", "blurry <lora:ia3:0.5>", seed=3, clip_skip=2, **SMALL),
    Request("a white triangle", seed=4, **SMALL),
]


def alone_in_hooks_mode(gen: Generator, reqs: list[Request]) -> list[Result]:
    gen.lora_mode = "hooks"
    try:
        return [gen(r) for r in reqs]
    finally:
        gen.lora_mode = "fused"
        gen.close()


def test_mixed_batch_equals_each_request_alone_and_leaves_weights(setup: tuple[BaseModel, Library],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    model, library = setup
    gen = Generator(model, library)
    pristine = snapshot(_components(model))
    alone = alone_in_hooks_mode(gen, MIXED)
    with caplog.at_level(logging.INFO, "lorakit"):
        batched = gen.run_batch(MIXED)
    assert "mixed-LoRA batch: 4 requests, 5 images in one UNet batch" in caplog.text
    assert_original(_components(model), pristine)  # no weight changed, no hook left
    assert not gen.multi.hooks and not gen.patcher.hooks.active and not gen.patcher.fused.active
    diffs = []
    for a, b in zip(alone, batched):
        assert isinstance(b, Result)
        assert b.seeds == a.seeds and b.infotexts == a.infotexts
        diffs.append(max_diff(a, b))
    print(f"max pixel difference batched vs alone (hooks), per request: {diffs}")
    assert max(diffs) <= 1
    # every LoRA changes its request's image: the test would catch a set applied to the wrong rows
    base = alone_in_hooks_mode(gen, [Request(r.prompt.split(" <")[0], seed=r.seed, batch=r.batch, **SMALL)
                                     for r in MIXED[:3]])
    assert all(max_diff(a, b) > 8 for a, b in zip(alone[:3], base))


def test_sdxl_mixed_batch_pooled_and_two_text_encoders(tmp_path: Path) -> None:
    pipe: Any = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    model = BaseModel(pipe, "tiny-xl", "0123456789", Arch.SDXL)
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    save_file(make_kohya_lora(comps, "lora", rank=4, seed=1), tmp_path / "xl_both.safetensors", {})
    save_file(make_kohya_lora(comps, lambda p: "lokr" if p.startswith("unet") else None, seed=2),
              tmp_path / "xl_lokr.safetensors", {})
    library = Library([tmp_path], index=tmp_path / "index.sqlite3")
    reqs = [Request("a cat <lora:xl_both:0.9>", seed=1, **SMALL), Request("a dog <lora:xl_lokr:1>", seed=2, **SMALL),
            Request("a bird", seed=3, **SMALL)]
    gen = Generator(model, library)
    pristine = snapshot(comps)
    alone = alone_in_hooks_mode(gen, reqs)
    batched = gen.run_batch(reqs)
    gen.close()
    diffs = [max_diff(a, b) for a, b in zip(alone, batched)]  # type: ignore[arg-type]
    print(f"SDXL: max pixel difference batched vs alone (hooks): {diffs}")
    assert max(diffs) <= 1
    assert_original(comps, pristine)


def test_rows_follow_the_cfg_layout() -> None:
    rows = RowMap([0, 1, 1, 2]).rows(8, torch.device("cpu"))
    assert {k: v.tolist() for k, v in rows.items()} == {0: [0, 4], 1: [1, 2, 5, 6], 2: [3, 7]}
    with pytest.raises(Exception, match="does not match the 4 samples"):
        RowMap([0, 1, 1, 2]).rows(6, torch.device("cpu"))


def test_multi_patcher_layer_output_per_row(setup: tuple[BaseModel, Library]) -> None:
    """One Linear: row r gets exactly its set's change (bitwise the change alone in hooks mode)."""
    from lorakit.patch import apply_loras

    model, library = setup
    paths = [library.resolve(n).path for n in ("locon", "loha")]
    unet = model.pipe.unet
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(4, 16, layer.in_features)
    with torch.no_grad():
        want = []
        for k, pairs in enumerate([[(paths[0], 0.5)], [(paths[1], 1.0), (paths[0], -1.0)]]):
            with apply_loras({"unet": unet}, pairs, mode="hooks"):
                want.append(layer(x))
        plain = layer(x)
        with MultiPatcher({"unet": unet}) as multi:
            multi.set([[(paths[0], 0.5)], [(paths[1], 1.0), (paths[0], -1.0)], []], [1, 0, 2, 1])
            got = layer(x)
        assert not multi.hooks
    for row, k in enumerate([1, 0, 2, 1]):
        expected = plain[row] if k == 2 else want[k][row]
        assert torch.equal(got[row], expected), row


def test_placed_factors_of_a_large_batch_stay_cached(tmp_path: Path) -> None:
    """A mixed batch with more LoRAs than the placement cache's default keeps every one placed, so the next batch
    moves none of them again (fp16 files: placing converts them, as moving to a GPU would)."""
    from lorakit.lora_model import load_cached
    from lorakit.patch import placement

    pipe: Any = tiny_sd1_pipeline()
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    paths = []
    for i in range(placement.CACHE_SIZE + 4):
        lora = {k: v.half() for k, v in make_kohya_lora(comps, "lora", rank=2, seed=i).items()}
        save_file(lora, tmp_path / f"l{i}.safetensors", {})
        paths.append(str(tmp_path / f"l{i}.safetensors"))
    sets = [[(p, 0.5)] for p in paths]
    with MultiPatcher({"unet": pipe.unet}) as multi:
        multi.set(sets, list(range(len(sets))))
    assert placement.capacity() >= len(paths)
    devices = {"unet": torch.device("cpu")}
    first = [placement.lora_on(load_cached(p), devices) for p in paths]
    again = [placement.lora_on(load_cached(p), devices) for p in paths]
    assert all(a is b for a, b in zip(first, again)), "every placed LoRA of the batch is still cached"


def test_incompatible_requests_fall_back(setup: tuple[BaseModel, Library], monkeypatch: pytest.MonkeyPatch) -> None:
    model, library = setup
    gen = Generator(model, library)
    reqs = [Request("a <lora:locon:0.5>", seed=1, **SMALL),
            Request("b <lora:loha:unet=0@0,1@1>", seed=2, **SMALL),  # a step schedule: alone
            Request("c <lora:no_such_lora:1>", seed=3, **SMALL),  # fails alone, the others go on
            Request("d", seed=4, **{**SMALL, "width": 128}),  # another size: alone
            Request("e <lora:lokr:1>", seed=5, **SMALL)]
    jobs = [resolve_job(r, library, 2) if i != 2 else None for i, r in enumerate(reqs)]
    assert group_jobs(jobs) == [[0, 4], [1], [3]]
    assert group_jobs(jobs, max_images=1) == [[0], [1], [3], [4]]
    mixed: list[int] = []
    real = gen._generate_mixed
    monkeypatch.setattr(gen, "_generate_mixed", lambda jobs: mixed.append(len(jobs)) or real(jobs))
    pristine = snapshot(_components(model))
    out = gen.run_batch(reqs)
    gen.close()
    assert mixed == [2]
    assert [type(r).__name__ for r in out] == ["Result", "Result", "LoraNameError", "Result", "Result"]
    assert out[3].images[0].size == (128, 64)  # type: ignore[union-attr]
    assert_original(_components(model), pristine)


def test_failing_mixed_batch_runs_one_by_one(setup: tuple[BaseModel, Library],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.errors import NonFiniteOutput

    model, library = setup
    gen = Generator(model, library)

    def nan(jobs: Any) -> Any:
        raise NonFiniteOutput("NaN/inf appeared in the latents at step 1 of 3")

    monkeypatch.setattr(gen, "_generate_mixed", nan)
    out = gen.run_batch([Request("a <lora:locon:0.5>", seed=1, **SMALL), Request("b", seed=2, **SMALL)])
    assert all(isinstance(r, Result) for r in out)
    gen.close()


A1111_SMALL: dict[str, Any] = {"steps": 3, "cfg_scale": 5.0, "sampler_name": "Euler a", "width": 64, "height": 64}
SERVED = [("a red circle <lora:locon:0.8>", 11), ("a blue star <lora:loha:1>", 12), ("a green square <lora:both:0.6>", 13)]


def test_serve_max_batch_runs_waiting_requests_in_one_batch(setup: tuple[BaseModel, Library]) -> None:
    import base64
    import io

    from PIL import Image

    from lorakit.server import create_app

    model, library = setup
    alone = alone_in_hooks_mode(Generator(model, library), [Request(p, seed=s, **SMALL) for p, s in SERVED])
    app = create_app(model, library, max_batch=8, batch_window_ms=2000)
    gen = app.state.lorakit.queue.generator
    calls: list[int] = []
    real = gen.run_batch
    gen.run_batch = lambda reqs, n: calls.append(len(reqs)) or real(reqs, n)
    pristine = snapshot(_components(model))
    out: dict[int, Any] = {}
    with running(app) as url:
        def post(i: int) -> None:
            body = {"prompt": SERVED[i][0], "seed": SERVED[i][1], **A1111_SMALL}
            out[i] = http.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = http.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x <lora:nope:1>", **A1111_SMALL}, timeout=60)
    assert calls[0] == 3 and bad.status_code == 422 and "nope" in bad.json()["detail"]
    for i in range(3):
        assert out[i].status_code == 200, out[i].text
        png = Image.open(io.BytesIO(base64.b64decode(out[i].json()["images"][0]))).convert("RGB")
        want = np.asarray(alone[i].images[0].convert("RGB")).astype(np.int16)
        assert int(np.abs(np.asarray(png).astype(np.int16) - want).max()) <= 1
    assert_original(_components(model), pristine)


def test_serve_refuses_bad_batching_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch must be a whole number ≥ 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--max-batch", "4", "--batch-window-ms", "nan"]) == 2
    assert "--batch-window-ms must be 0 to 10000" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_folder(setup: tuple[BaseModel, Library], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model") / "tiny"
    setup[0].pipe.save_pretrained(str(folder))
    return folder


def test_lorakit_batch_runs_compatible_jobs_batched(setup: tuple[BaseModel, Library], model_folder: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from lorakit.cli import main

    model, library = setup
    lines = [{"prompt": p, "seed": s, **A1111_SMALL} for p, s in SERVED]
    lines.insert(1, {**A1111_SMALL, "prompt": "x", "steps": 2})  # other steps: runs alone
    lines.append({"prompt": "a square", "seed": 14, "batch_size": 2, "n_iter": 2, **A1111_SMALL})
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    calls: list[int] = []
    real = Generator.run_batch
    monkeypatch.setattr(Generator, "run_batch", lambda self, reqs, n=8: calls.append(len(reqs)) or real(self, reqs, n))
    out = tmp_path / "out"
    folder = str(library.entries[0].path.parent)
    assert main(["batch", str(jobs), "-o", str(out), "-m", str(model_folder), "-l", folder]) == 0
    assert calls == [6]  # every request in one run_batch: 3 + the two n_iter requests in one UNet batch
    records = {r["line"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records[2]["settings"]["steps"] == 2 and records[5]["seeds"] == [14, 15, 16, 17]
    alone = alone_in_hooks_mode(Generator(model, library), [Request(p, seed=s, **SMALL) for p, s in SERVED])
    for line, want in zip((1, 3, 4), alone):
        got = np.asarray(Image.open(out / records[line]["images"][0]).convert("RGB")).astype(np.int16)
        assert int(np.abs(got - np.asarray(want.images[0].convert("RGB")).astype(np.int16)).max()) <= 1
        assert records[line]["seeds"] == want.seeds


def test_lorakit_batch_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a"}) + "\n")
    assert main(["batch", str(jobs), "-o", str(tmp_path / "o"), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert main(["batch", str(jobs), "-o", str(tmp_path / "o"), "--max-batch", "0", "--ray"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err


def test_worker_window_collects_generate_jobs_and_keeps_order() -> None:
    """Jobs arriving within the window join one ``run_batch`` up to ``max_batch`` images; another kind of job
    ends the collection and runs next; an error reaches only its own job."""
    import time

    from lorakit.errors import LoraNameError
    from lorakit.server.worker import GenerationQueue

    class Fake:
        on_step = None

        def __init__(self) -> None:
            self.log: list[Any] = []

        def run_batch(self, reqs: list[Request], n: int) -> list[Any]:
            self.log.append([r.prompt for r in reqs])
            return [LoraNameError("no LoRA named 'bad'") if r.prompt == "bad" else r.prompt for r in reqs]

        def close(self) -> None:
            pass

    fake = Fake()
    queue = GenerationQueue(fake, max_batch=3, window_ms=1000)  # type: ignore[arg-type]
    futures: dict[str, Any] = {}
    threads = []
    for name, batch in (("a", 1), ("bad", 1), ("c", 1), ("d", 1)):
        def run(name: str = name, batch: int = batch) -> None:
            try:
                futures[name] = queue.generate([Request(name, batch=batch)])
            except LoraNameError as e:
                futures[name] = e
        threads.append(threading.Thread(target=run))
        threads[-1].start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert fake.log == [["a", "bad", "c"], ["d"]]
    assert futures["a"] == ["a"] and futures["c"] == ["c"] and isinstance(futures["bad"], LoraNameError)
    x = threading.Thread(target=queue.generate, args=([Request("x")],))
    x.start()
    time.sleep(0.05)
    call = queue.submit(lambda: fake.log.append("call"))  # arrives inside x's window: ends it, runs next
    time.sleep(0.05)
    y = threading.Thread(target=queue.generate, args=([Request("y")],))
    y.start()
    for t in (x, y):
        t.join()
    call.result()
    queue.close()
    assert fake.log[2:] == [["x"], "call", ["y"]]
    assert queue.snapshot().job_count == 0 and queue.snapshot().job_no == 7
