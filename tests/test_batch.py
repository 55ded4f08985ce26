"""Batches from a JSONL file: A1111 field names → requests, errors naming the line, a local run (demo model, 64 px,
1 step) writing images and results.jsonl, re-runs that skip finished items, and a torn results line repaired."""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lorakit.batch.jobs import RESULTS, Item, Outcome, check_loras, local_runner, read_jobs, run_batch
from lorakit.batch.results import finished
from lorakit.batch.ray_runner import group_order
from lorakit.cli import main
from lorakit.errors import BatchError, LorakitError
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.models.loading import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"
SMALL = {"steps": 1, "width": 64, "height": 64}


def _jobs(tmp_path: Path, *lines: Any) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_a1111_fields_become_requests(tmp_path: Path) -> None:
    path = _jobs(tmp_path, {"prompt": "a <lora:s:0.5>", "negative_prompt": "ugly", "seed": 10, "steps": 9,
                            "cfg_scale": 4.5, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "width": 128,
                            "height": 64, "batch_size": 2, "n_iter": 2,
                            "override_settings": {"CLIP_stop_at_last_layers": 2}, "restore_faces": False},
                 "", {"prompt": "b", "seed": -1})
    first, second = read_jobs(path)
    assert (first.line, second.line) == (1, 3) and first.key.startswith("000001-")
    a, b = first.requests
    assert a == Request("a <lora:s:0.5>", "ugly", 9, 4.5, "DPM++ 2M Karras", 10, 128, 64, 2, 2, False)
    assert b.seed == 12  # iteration 2 continues the seeds of a 2-image batch, as A1111 numbers them
    (req,) = second.requests
    assert req.seed is not None and req.seed >= 0 and req.steps is None  # -1: drawn when read; steps: default
    assert first.lora_set != second.lora_set


@pytest.mark.parametrize("line, problem", [
    ("{not json", ":2: not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", ":2: expected a JSON object of A1111 txt2img fields, got list"),
    ('{"prompt": "a", "steps": 0}', ":2: field 'steps': Input should be greater than or equal to 1"),
    ('{"prompt": "a", "width": 65}', ":2: field 'width': Input should be a multiple of 8"),
    ('{"prompt": 5}', ":2: field 'prompt': Input should be a valid string"),
    ('{"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 0}}', ":2: override_settings.CLIP_stop"),
    ('{"prompt": "a", "negative_prompt": "<lora:s"}', ":2: field 'negative_prompt': "),
    ('{"prompt": "a <lora:s:x>"}', ":2: field 'prompt': prompt, column 11: expected a number"),
])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = _jobs(tmp_path, {"prompt": "fine"}, line)
    with pytest.raises(BatchError) as e:
        read_jobs(path)
    assert str(e.value).startswith(str(path)) and problem in str(e.value)


def test_empty_or_missing_file_and_unknown_lora(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="no requests"):
        read_jobs(_jobs(tmp_path, "", "  "))
    with pytest.raises(BatchError, match="cannot read the jobs file"):
        read_jobs(tmp_path / "absent.jsonl")
    path = _jobs(tmp_path, {"prompt": "a <lora:demo_style:1>"}, {"prompt": "b <lora:no_such_lora:1>"})
    with pytest.raises(BatchError, match=r"jobs.jsonl:2: .*no_such_lora"):
        check_loras(read_jobs(path), Library([EXAMPLES]), path)


def test_groups_keep_first_appearance_and_file_order(tmp_path: Path) -> None:
    path = _jobs(tmp_path, *({"prompt": f"p{i} <lora:s:{i % 2}>"} for i in range(5)), {"prompt": "plain"})
    order = [item.line for item in group_order(read_jobs(path))]
    assert order == [1, 3, 5, 2, 4, 6]


def _fake_runner(calls: list[int], fail: set[int] = frozenset()) -> Any:  # type: ignore[assignment]
    def run(items: list[Item]) -> Iterator[Outcome]:
        for item in items:
            calls.append(item.line)
            if item.line in fail:
                yield Outcome({"key": item.key, "line": item.line, "error": "boom", "worker": "fake"})
                continue
            px = np.full((8, 8, 3), item.line, dtype=np.uint8)
            yield Outcome({"key": item.key, "line": item.line, "seeds": [1], "infotexts": [f"line {item.line}"],
                           "worker": "fake"}, [px])
    return run


def test_rerun_skips_finished_items_and_retries_failed_or_edited(tmp_path: Path) -> None:
    path, out = _jobs(tmp_path, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}), tmp_path / "out"
    calls: list[int] = []
    summary = run_batch(read_jobs(path), out, _fake_runner(calls, fail={2}))
    assert (summary.done, summary.failed, summary.skipped, calls) == (2, 1, 0, [1, 2, 3])
    summary = run_batch(read_jobs(path), out, _fake_runner(calls))
    assert (summary.done, summary.skipped, calls[3:]) == (1, 2, [2])  # only the failed one again
    (out / min(p.name for p in out.glob("000003-*.png"))).unlink()  # a lost image: that item again
    path.write_text(path.read_text().replace('"a"', '"A"'))  # an edited line: a new key
    summary = run_batch(read_jobs(path), out, _fake_runner(calls))
    assert (summary.done, summary.skipped, calls[4:]) == (2, 1, [1, 3])
    records = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert len(records) == 6 and records[1]["error"] == "boom" and "images" not in records[1]
    assert Image.open(out / records[0]["images"][0]).text["parameters"] == "line 1"


def test_torn_last_results_line_is_dropped(tmp_path: Path) -> None:
    path, out = _jobs(tmp_path, {"prompt": "a"}, {"prompt": "b"}), tmp_path / "out"
    run_batch(read_jobs(path), out, _fake_runner([]))
    results = out / RESULTS
    good = results.read_text()
    results.write_text(good + '{"key": "000002-x", "line"')  # a crash in the middle of a write
    assert len(finished(out)) == 2 and results.read_text() == good  # repaired: the torn tail is gone
    assert not list(out.glob(".*tmp*"))  # no temporary files left


def test_cli_batch_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = _jobs(tmp_path, {"prompt": "a"})
    assert main(["batch", str(path), "-o", str(tmp_path / "o"), "--workers", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["batch", str(path), "-o", str(tmp_path / "o"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lorakit[ray]'" in err
    bad = _jobs(tmp_path, {"prompt": "a"}, "{")
    assert main(["batch", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err


def test_local_batch_writes_images_and_results(tmp_path: Path) -> None:
    path = _jobs(tmp_path, {"prompt": "a cat <lora:demo_style:0.5>", "seed": 3, **SMALL},
                 {"prompt": "a cat <lora:no_such_lora:1>", "seed": 4, **SMALL},
                 {"prompt": "a dog", "seed": 5, "batch_size": 2, "sampler_name": "Euler", **SMALL})
    gen = Generator(load_model(None), Library([EXAMPLES]))
    summary = run_batch(read_jobs(path), tmp_path / "out", local_runner(lambda: gen))
    assert (summary.done, summary.failed) == (2, 1)  # an unknown LoRA fails its item, not the batch
    records = {r["line"]: r for r in map(json.loads, (tmp_path / "out" / RESULTS).read_text().splitlines())}
    assert "no_such_lora" in records[2]["error"]
    first, third = records[1], records[3]
    assert third["seeds"] == [5, 6] and len(third["images"]) == 2 and third["settings"]["sampler"] == "Euler"
    assert first["worker"] == "local" and first["seconds"] > 0 and "demo_style" in first["infotexts"][0]
    alone = gen(Request("a cat <lora:demo_style:0.5>", seed=3, **SMALL))
    written = Image.open(tmp_path / "out" / first["images"][0])
    assert written.text["parameters"] == alone.infotexts[0] == first["infotexts"][0]
    assert np.array_equal(np.asarray(written), np.asarray(alone.images[0]))
    gen.close()


def test_local_runner_error_restores_weights_and_reports(tmp_path: Path) -> None:
    """A LorakitError inside an item becomes that item's error; the generator is closed at the end."""
    closed: list[bool] = []

    class Failing:
        on_step = None

        def __call__(self, req: Request) -> Any:
            raise LorakitError("non-finite latents at step 1")

        def close(self) -> None:
            closed.append(True)

    path = _jobs(tmp_path, {"prompt": "a"})
    summary = run_batch(read_jobs(path), tmp_path / "o", local_runner(lambda: Failing()))  # type: ignore[arg-type,return-value]
    assert summary.failed == 1 and closed == [True]
