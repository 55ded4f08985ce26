"""Batches on Ray: a local Ray (4 logical CPUs, 2 actors) gives the same PNG bytes and records as the local run.
Skipped where Ray is not installed, except in CI (``pip install -e '.[test,ray]'``), where it must run."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorakit.batch.jobs import RESULTS, local_runner, read_jobs, run_batch
from lorakit.batch.ray_runner import GenerateWorker, Pool, WorkerConfig, ray_runner
from lorakit.cli import main
from lorakit.generate.pipeline import Generator
from lorakit.library import Library
from lorakit.models.loading import load_model

try:
    import ray
    import ray.data
except ImportError:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Ray for the batch tests: pip install -e '.[test,ray]'") from None
    pytest.skip("Ray is not installed (pip install 'lorakit[ray]')", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"
# Ray Data reads its own deprecated settings when it copies its context to the workers: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
SMALL = {"steps": 1, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def local_ray() -> Any:
    # More logical CPUs than actors: a pool holding every CPU would starve Ray Data's read task (deadlock).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _records(out: Path) -> dict[int, dict[str, Any]]:
    return {r["line"]: r for r in map(json.loads, (out / RESULTS).read_text().splitlines())}


def test_ray_batch_is_bitwise_the_local_run(tmp_path: Path, local_ray: Any) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "a cat <lora:demo_style:0.5>", "seed": 1, **SMALL},
             {"prompt": "a dog", "seed": 2, "cfg_scale": 5, **SMALL},
             {"prompt": "a cow <lora:demo_style:0.5>", "seed": 3, "batch_size": 2, **SMALL},
             {"prompt": "a cat <lora:no_such_lora:1>", "seed": 4, **SMALL}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_jobs(jobs)
    gen = Generator(load_model(None), Library([EXAMPLES]))
    local = run_batch(items, tmp_path / "local", local_runner(lambda: gen))
    # The actors' torch threads: this process's count (what the local run used); Ray alone would set 1.
    config = WorkerConfig(None, {}, [str(EXAMPLES)], [], torch.get_num_threads())
    remote = run_batch(items, tmp_path / "ray", ray_runner(config, Pool(workers=2, cpus=1.0)))
    assert (local.done, local.failed) == (remote.done, remote.failed) == (3, 1)
    a, b = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for line in (1, 2, 3):
        assert b[line]["worker"].startswith("ray:") and a[line]["worker"] == "local"
        for key in ("seeds", "infotexts", "images", "prompt", "settings"):
            assert a[line][key] == b[line][key], (line, key)
        for name in a[line]["images"]:
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    assert "no_such_lora" in b[4]["error"]
    assert len({b[line]["worker"] for line in b}) <= 2  # the pool's actors, no more


def test_ray_mixed_lora_batches_are_bitwise_the_local_batched_run(tmp_path: Path, local_ray: Any) -> None:
    """With max_images > 1 both cut the same runs of items and sample their compatible requests in the same
    mixed-LoRA UNet batches: the same bytes."""
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": f"a shape <lora:{name}:0.8>", "seed": i, **SMALL, "steps": 2}
             for i, name in enumerate(["blueprint_style", "sunset_lokr", "demo_style", "blueprint_style",
                                       "sunset_lokr", "demo_style"] * 2)]  # two runs of 8 images: both actors
    lines.append({"prompt": "plain", "seed": 9, **SMALL, "steps": 3})
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_jobs(jobs)
    gen = Generator(load_model(None), Library([EXAMPLES]))
    local = run_batch(items, tmp_path / "local", local_runner(lambda: gen, max_images=2))
    config = WorkerConfig(None, {}, [str(EXAMPLES)], [], torch.get_num_threads(), max_images=2)
    remote = run_batch(items, tmp_path / "ray", ray_runner(config, Pool(workers=2, cpus=1.0)))
    assert local.done == remote.done == 13
    a, b = _records(tmp_path / "local"), _records(tmp_path / "ray")
    for line in a:
        assert a[line]["infotexts"] == b[line]["infotexts"]
        for name in a[line]["images"]:
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), line


def test_a_worker_whose_model_does_not_load_fails_its_items(tmp_path: Path, local_ray: Any) -> None:
    """The actor class itself, called in this process: every item becomes one error record, no traceback."""
    worker = GenerateWorker(asdict(WorkerConfig("/no/such/model", {}, [str(EXAMPLES)], [], 1)))
    out = worker({"key": np.array(["000001-x"], dtype=object), "line": np.array([1]),
                  "requests": np.array(['[{"prompt": "a"}]'], dtype=object)})
    record = json.loads(out["record"][0])
    assert record["error"].startswith("the Ray worker could not load the model: /no/such/model") and not out["pixels"][0]


def test_cli_checks_a_local_model_path_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a"}\n')
    assert main(["batch", str(jobs), "-o", str(tmp_path / "o"), "--ray", "-m", "/no/such/model"]) == 2
    assert "/no/such/model: no such model file or folder" in capsys.readouterr().err
