"""``lorakit serve --ray`` without a Ray cluster: the flags (one-line errors), the LoRA-set routing key, the switch
count, the job table (idempotency keys, stops, progress), the ingress's retries ending in a 503, the Serve config
file, and ``lorakit batch``'s de-duplication of a retried item."""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lorakit.batch.jobs import Outcome, read_jobs, run_batch
from lorakit.cli import main
from lorakit.errors import LoraNameError
from lorakit.generate.pipeline import Request, Result
from lorakit.server.a1111 import Task
from lorakit.serve_ray.config import ClusterConfig, ServeConfigError, model_options, parse_autoscale
from lorakit.serve_ray.keys import NO_LORAS, SetCounter, routing_id, set_key
from lorakit.serve_ray.table import LEASE_S, JobTable

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"
# Ray Serve's own pydantic fields and Ray's deprecations: not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.parametrize("argv, message", [
    (["--ray", "--autoscale", "4"], "--autoscale must be MIN:MAX"),
    (["--ray", "--autoscale", "3:1"], "0 ≤ MIN ≤ MAX"),
    (["--ray", "--replicas", "0"], "--replicas must be 1 to"),
    (["--replicas", "2"], "--replicas need --ray"),
    (["--address", "auto"], "--address need --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "either --replicas or --autoscale"),
    (["--ray", "--address", "127.0.0.1:1"], "cannot reach Ray at 127.0.0.1:1"),
    (["--ray", "--address", "nowhere"], "--address must be auto, host:port or ray://host:port"),
    (["--ray", "-l", "/no/such/folder"], "/no/such/folder: folder does not exist"),
    (["--ray", "--api-auth", "nocolon"], "--api-auth must be USER:PASSWORD"),
])
def test_bad_ray_flags_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    assert main(["serve", "--options-file", str(tmp_path / "o.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_serve_ray_without_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--ray", "-l", str(EXAMPLES), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("lorakit: error: --ray needs Ray Serve, which is not installed: "
                                               "pip install 'lorakit[ray]' (or: pip install 'ray[serve]')")


def test_autoscale_becomes_serve_autoscaling() -> None:
    assert parse_autoscale(" 1 : 4 ") == (1, 4)
    options = model_options(ClusterConfig(autoscale=(0, 3), max_batch=4, replica_gpus=1))
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "initial_replicas": 1,
                                             "target_ongoing_requests": 4}
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1} and options["max_ongoing_requests"] == 8
    assert "num_replicas" not in options
    with pytest.raises(ServeConfigError, match="unknown lorakit serve args: colour"):
        ClusterConfig.from_args({"colour": "red"})
    cfg = ClusterConfig(autoscale=(1, 2), lora_dirs=["/x"])
    assert ClusterConfig.from_args(cfg.as_args()) == cfg
    assert "replicas" not in cfg.replica_args() and ClusterConfig.from_args(cfg.replica_args()).lora_dirs == ["/x"]


def test_the_set_key_is_canonical() -> None:
    names = {"unet_only": "chars/unet_only", "chars/unet_only": "chars/unet_only", "demo_style": "demo_style"}

    def resolve(name: str) -> str:
        if name not in names:
            raise LoraNameError(f"{name}: no such LoRA")
        return names[name]

    a = set_key(Request("a <lora:unet_only:0.5> <lora:demo_style:1>"), resolve)
    b = set_key(Request("b <lora:demo_style> c <lora:chars/unet_only:0.5>"), resolve)
    assert a == b == "chars/unet_only:te=0.5,unet=0.5|demo_style:te=1,unet=1"
    assert set_key(Request("<lora:demo_style:1:0.5>"), resolve) != set_key(Request("<lora:demo_style:1>"), resolve)
    assert set_key(Request("x", "<lora:Other:1>")) == "other:te=1,unet=1"  # the negative prompt's count too
    assert set_key(Request("no loras")) == NO_LORAS
    assert routing_id("demo", "a").startswith("demo#") and len(routing_id("m", "x" * 2000)) < 200


def test_switch_counter_counts_changes_and_misses() -> None:
    counter = SetCounter(keep=2)
    for key in ["a", "a", "b", "a", "c", "b", NO_LORAS, "b"]:
        counter.observe(key)
    assert counter.changes == {"a": 2, "b": 3, "c": 1}
    assert counter.misses == {"a": 1, "b": 2, "c": 1}  # b fell out of the 2 most recent when c came
    report = counter.as_dict()
    assert report["requests"] == 8 and report["changes_total"] == 6 and report["misses_total"] == 4
    assert report["batches"] == report["largest_batch"] == 0
    counter.observe_batch(3)
    counter.observe_batch(2)
    assert counter.as_dict()["batches"] == 2 and counter.as_dict()["largest_batch"] == 3


def test_switch_counter_keeps_its_report_small_and_its_totals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.serve_ray.keys as keys

    monkeypatch.setattr(keys, "MAX_COUNTED", 3)
    counter = SetCounter(keep=2)
    for key in ["a", "b", "c", "d", "e", "a"]:
        counter.observe(key)
    report = counter.as_dict()
    assert len(report["changes"]) == len(report["misses"]) == 3 and "e" in report["changes"]
    assert report["changes_total"] == report["misses_total"] == 6


def test_job_table_keys_answer_retries_and_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    table = JobTable({"samples_format": "png"})
    assert table.begin("k", "f1") == {"state": "new"}
    assert table.begin("k", "f1") == {"state": "running"}
    assert table.begin("k", "f2") == {"state": "conflict"}
    table.finish("k", ["images"], 10)
    assert table.begin("k", "f1") == {"state": "done", "results": ["images"]}
    table.begin("gone", "f")
    table.finish("gone", None)  # failed: free for a retry
    assert table.begin("gone", "f") == {"state": "new"}
    import lorakit.serve_ray.table as table_module

    now = table_module.time.monotonic()
    monkeypatch.setattr(table_module.time, "monotonic", lambda: now + LEASE_S + 1)
    assert table.begin("gone", "f") == {"state": "new"}  # its owner stopped touching it: taken over


def test_job_table_stops_only_the_batches_running_and_sums_progress() -> None:
    table = JobTable({})
    model = {"title": "demo [h]", "hash": "h", "entry_title": "demo"}
    assert table.report("r1", {"started": 5.0, "elapsed": 2.0, "step": 3, "steps": 10, "job_count": 2, "job_no": 4,
                               "model": model})["stop"] is None
    table.report("r2", {"started": 0.0, "elapsed": 0.0, "step": 0, "steps": 0, "job_count": 0, "job_no": 1})
    assert table.options["sd_model_checkpoint"] == "demo [h]"  # the first report's model
    assert table.interrupt("interrupt") == 1
    snap = table.snapshot()
    assert (snap["job_count"], snap["job_no"], snap["step"], snap["steps"], snap["stopping"]) == (2, 5, 3, 10,
                                                                                                 "interrupt")
    assert table.report("r1", {"started": 5.0, "elapsed": 2.1, "step": 4, "steps": 10})["stop"] == "interrupt"
    assert table.report("r2", {"started": 9.0, "elapsed": 0.0, "step": 1, "steps": 10})["stop"] is None
    assert table.report("r1", {"started": 7.0, "elapsed": 0.0, "step": 1, "steps": 10})["stop"] is None  # a new batch
    assert table.interrupt("skip") == 2  # /skip: both batches running now, each told to skip its current image
    assert [table.report(r, {"started": t, "elapsed": 0.1, "step": 2, "steps": 10})["stop"]
            for r, t in (("r1", 7.0), ("r2", 9.0))] == ["skip", "skip"]
    view = table.set_model({**model, "title": "tiny [g]", "hash": "g"})
    assert view["generation"] == 1 and view["options"]["sd_model_checkpoint"] == "tiny [g]"


class _Response:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def result(self, timeout_s: float | None = None) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        pass


class _Handle:
    """A stand-in for a deployment handle: ``generate`` raises ``errors`` in turn, then answers."""

    def __init__(self, errors: list[BaseException], answer: Any = None) -> None:
        self.errors, self.answer, self.calls = list(errors), answer, 0

    def options(self, **_: Any) -> "_Handle":
        return self

    def __getattr__(self, name: str) -> Any:
        handle = self

        class Method:
            def remote(self, *args: Any) -> _Response:
                if name == "generate":
                    handle.calls += 1
                    return _Response(handle.errors.pop(0) if handle.errors else handle.answer)
                return _Response(_TABLE.get(name, lambda *a: None)(*args))

        return Method()


_TABLE: dict[str, Any] = {"view": lambda: {"model": {"entry_title": "demo"}}, "begin": lambda *a: {"state": "new"}}


def test_a_request_whose_replicas_keep_dying_is_a_503_after_the_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray.serve")
    from ray.exceptions import ActorDiedError
    from starlette.testclient import TestClient

    import lorakit.serve_ray.queue as queue_module
    from lorakit.serve_ray.queue import ClusterQueue, ClusterUnavailable

    monkeypatch.setattr(queue_module.time, "sleep", lambda s: None)
    cfg = ClusterConfig(retries=2)
    dead = [ActorDiedError() for _ in range(3)]
    queue = ClusterQueue(cfg, _Handle(dead), _Handle([]), None)
    with pytest.raises(ClusterUnavailable, match="failed on 3 replicas in turn.*retry in a minute"):
        queue.generate([Request("a")])
    answer = [Result([], [1], ["text"])]
    handle = _Handle([ActorDiedError()], answer)
    results = ClusterQueue(cfg, handle, _Handle([]), None).generate([Request("a")], Task("t", "f"))
    assert handle.calls == 2 and "retried on another replica, same seed" in results[0].notes[0]

    from fastapi import FastAPI

    from lorakit.serve_ray.ingress import _unavailable

    app = FastAPI()
    app.add_exception_handler(ClusterUnavailable, _unavailable)  # type: ignore[arg-type]

    @app.get("/x")
    def fail() -> None:
        raise ClusterUnavailable("gone; retry")

    r = TestClient(app).get("/x")
    assert r.status_code == 503 and r.headers["retry-after"] == "30" and r.json()["detail"] == "gone; retry"


def test_write_serve_config_is_a_valid_serve_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    assert main(["serve", "--write-serve-config", str(out), "-l", str(EXAMPLES), "--autoscale", "1:4",
                 "--replica-gpus", "1", "--max-batch", "4", "--options-file", str(tmp_path / "o.json")]) == 0
    doc = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "lorakit.serve_ray.deployments:app_builder" and app.args["lora_dirs"] == [str(EXAMPLES)]
    model = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "LorakitModel")
    assert model["autoscaling_config"]["max_replicas"] == 4 and model["ray_actor_options"]["num_gpus"] == 1
    assert model["max_ongoing_requests"] == 8


def test_batch_writes_one_record_per_item_when_a_retry_repeats_it(tmp_path: Path) -> None:
    """A retried Ray task may deliver an item's outcome twice: one record, one set of images."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "seed": 1}\n{"prompt": "b", "seed": 2}\n')
    items = read_jobs(jobs)

    def twice(pending: list[Any]) -> Any:
        for item in pending + pending[:1]:
            yield Outcome({"key": item.key, "line": item.line, "error": "x"})

    summary = run_batch(items, tmp_path / "out", twice)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and summary.failed == 2 and len({json.loads(x)["key"] for x in lines}) == 2


def _within(sub: Any, full: Any) -> bool:
    """Every value ``sub`` sets is ``full``'s (nested dicts compared key by key)."""
    if isinstance(sub, dict):
        return isinstance(full, dict) and all(k in full and _within(v, full[k]) for k, v in sub.items())
    return bool(sub == full)


def test_the_kubernetes_example_is_the_serve_config_lorakit_writes() -> None:
    """docs/serving.md's RayService: a valid Serve config whose args lorakit accepts, and whose deployment
    settings are what ``--write-serve-config`` writes for the same flags."""
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from lorakit.serve_ray.run import serve_config

    service = yaml.safe_load((EXAMPLES.parent / "serve" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    doc = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = ServeDeploySchema.model_validate(doc).applications[0]
    assert app.import_path == "lorakit.serve_ray.deployments:app_builder"
    cfg = ClusterConfig.from_args(app.args)
    assert cfg.max_batch == 4 and cfg.ingress_replicas == 2
    flags = replace(cfg, autoscale=(1, 4), replica_gpus=1.0)  # --autoscale 1:4 on a cluster with GPUs
    written = yaml.safe_load(serve_config(flags, "0.0.0.0", 8000))["applications"][0]["deployments"]
    example = doc["applications"][0]["deployments"]
    assert [d["name"] for d in example] == [d["name"] for d in written]
    for mine, theirs in zip(example, written):
        assert _within(mine, theirs), (mine, theirs)
