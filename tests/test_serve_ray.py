"""``lorakit serve --ray`` on a local Ray (4 logical CPUs: 2 model replicas of the demo model at 1 CPU each; the
ingress, the job table, Serve's controller and proxy take none): the unchanged ``webuiapi`` client, every image
bitwise the single-process server's, LoRA-affinity routing, cluster-wide progress/interrupt/options/model switch,
idempotency keys, a replica killed mid-request (nothing lost) and a drained downscale. One cluster for the module.
Skipped where Ray Serve is not installed, except in CI (``pip install -e '.[test,ray]'``), where it must run."""
from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import webuiapi
import yaml
from PIL import Image

try:
    from ray import serve  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Ray Serve for these tests: pip install -e '.[test,ray]'") from None
    pytest.skip("Ray Serve is not installed (pip install 'lorakit[ray]')", allow_module_level=True)

from lorakit.library import Library
from lorakit.models.loading import demo_model
from lorakit.serve_ray.config import ClusterConfig
from lorakit.serve_ray.run import serve_config
from lorakit.generate.pipeline import Request
from lorakit.serve_ray.keys import SetCounter, set_key
from lorakit.server import create_app
from lorakit.server.models import ModelCatalog, entry_for

from .factories import tiny_sd1_pipeline
from .serve_cluster import (cluster_view, deploy_config, local_ray, replica_actor, running_replicas, start_serve,
                            wait_for)
from .servers import EXAMPLES, demo_lora_folder, running

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic fields
SMALL = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 5.0, "sampler_name": "Euler"}
# 8 LoRA sets over 4 demo-model LoRAs: 4 singles, 3 pairs, 1 triple
SETS = ["<lora:demo_style:0.8>", "<lora:loha_style:0.7>", "<lora:unet_only:1>", "<lora:blueprint_style:0.9>",
        "<lora:demo_style:0.5> <lora:loha_style:0.5>", "<lora:unet_only:0.6> <lora:blueprint_style:0.6>",
        "<lora:demo_style:0.4> <lora:unet_only:0.4>", "<lora:demo_style:0.3> <lora:loha_style:0.3> <lora:unet_only:0.3>"]


@dataclass
class Cluster:
    url: str  # lorakit serve --ray
    ref: str  # the single-process lorakit serve over the same files
    ray: Any
    cfg: ClusterConfig
    folder: Path
    config: dict[str, Any]  # the Serve config it was deployed with


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("serve-ray")
    folder = demo_lora_folder(root / "loras")
    shutil.copy(EXAMPLES / "blueprint_style.safetensors", folder / "blueprint_style.safetensors")
    models = root / "models"
    pipe: Any = tiny_sd1_pipeline()
    pipe.save_pretrained(models / "tiny")
    (models / "broken").mkdir()
    (models / "broken" / "model_index.json").write_text("{not json")
    # The replicas' torch threads: this process's count, as the reference server's (same arithmetic, same bits).
    cfg = ClusterConfig(lora_dirs=[str(folder)], models_dirs=[str(models)], library_index=str(root / "index.db"),
                        replicas=2, threads=torch.get_num_threads(), retries=3, request_timeout_s=300,
                        max_ongoing_requests=4)
    reference = create_app(demo_model(), Library([folder], index=root / "ref-index.db"),
                           catalog=ModelCatalog([models], entry_for(None, [models])))
    with local_ray(cpus=4) as ray, running(reference) as ref:
        url = start_serve()
        # Deployed as `serve deploy` does, from the config `lorakit serve --write-serve-config` writes.
        doc = yaml.safe_load(serve_config(cfg, "127.0.0.1", int(url.rsplit(":", 1)[1])))
        deploy_config(doc)
        yield Cluster(url, ref, ray, cfg, folder, doc)


def _post(url: str, body: dict[str, Any], path: str = "txt2img", **kw: Any) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/{path}", json=body, timeout=300, **kw)


def _images(reply: requests.Response) -> list[bytes]:
    assert reply.status_code == 200, reply.text[:500]
    return [base64.b64decode(b) for b in reply.json()["images"]]


def _notes(reply: requests.Response) -> list[str]:
    return list(json.loads(reply.json()["info"])["notes"])


def _api(url: str) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), sampler="Euler", steps=3)


def _served(url: str) -> int:
    return sum(r["served"] for r in cluster_view(url)["replicas"])


def test_webuiapi_unchanged_and_every_image_bitwise_the_single_server(cluster: Cluster) -> None:
    api, ref = _api(cluster.url), _api(cluster.ref)
    assert {e["name"] for e in api.get_loras()} == {e["name"] for e in ref.get_loras()}
    assert api.get_sd_models() == ref.get_sd_models() and api.util_get_current_model() == "demo [eae2d4d6c3]"
    kw = dict(prompt="a cabin <lora:demo_style:0.8>", negative_prompt="blurry <lora:loha_style:0.3>", seed=11,
              width=64, height=64, batch_size=2, n_iter=2, cfg_scale=6)
    a, b = api.txt2img(**kw), ref.txt2img(**kw)
    assert len(a.images) == 4 and a.info["all_seeds"] == b.info["all_seeds"] == [11, 12, 13, 14]
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert a.info["infotexts"] == b.info["infotexts"]
    init = Image.new("RGB", (64, 64), (30, 60, 200))
    kw2 = dict(images=[init], prompt="a red circle <lora:unet_only:0.8>", seed=7, denoising_strength=0.6, width=64,
               height=64, cfg_scale=5)
    c, d = api.img2img(**kw2), ref.img2img(**kw2)
    assert c.images[0].tobytes() == d.images[0].tobytes()
    assert api.png_info(a.images[0]).info == ref.png_info(b.images[0]).info == a.info["infotexts"][0]
    assert api.get_embeddings() == ref.get_embeddings()
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        r = _post(cluster.url, {"prompt": "a cat", **SMALL, "seed": 3})
        assert "Clip skip: 2" in r.json()["info"]
        assert requests.post(f"{cluster.url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 99},
                             timeout=30).status_code == 422
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    r = _post(cluster.url, {"prompt": "x <lora:ink_sketch_sd15:1>", **SMALL})
    assert r.status_code == 422 and r.json()["error"] == "IncompatibleLora"  # the replica's error, as alone
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["state"]["job_no"] > 0


def _shuffled_bodies(n: int, seed: int) -> list[dict[str, Any]]:
    order = [i % len(SETS) for i in range(n)]
    random.Random(seed).shuffle(order)
    return [{"prompt": f"a shape {SETS[s]}", **SMALL, "seed": 1000 + k} for k, s in enumerate(order)]


def _misses(view: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {r["replica"]: dict(r["switches"]["misses"]) for r in view["replicas"]}


def test_affinity_routing_keeps_each_set_on_a_replica(cluster: Cluster) -> None:
    """32 requests over 8 LoRA sets in random order, 4 in flight: a replica places (misses) a set at most a few
    times, where routing that ignores the set would miss on about half the requests; every image is bitwise the
    single server's."""
    before = _misses(cluster_view(cluster.url))
    bodies = _shuffled_bodies(32, seed=5)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: _post(cluster.url, b), bodies))
    after = _misses(cluster_view(cluster.url))
    misses = {r: {k: n - before.get(r, {}).get(k, 0) for k, n in m.items()} for r, m in after.items()}
    total = sum(sum(m.values()) for m in misses.values())
    assert max(n for m in misses.values() for n in m.values()) <= 3, misses
    rng, blind = random.Random(0), [SetCounter(4), SetCounter(4)]  # the same order, each to a random replica
    for body in bodies:
        blind[rng.randrange(2)].observe(body["prompt"])
    assert total <= 14 < sum(sum(c.misses.values()) for c in blind), (misses, [c.misses for c in blind])
    for body, reply in zip(bodies[:8], replies):
        assert _images(reply) == _images(_post(cluster.ref, body)), body["prompt"]


def _one_set_per_replica(cluster: Cluster) -> list[str]:
    """A LoRA set each replica holds (after one quick request per set where a replica holds none): requests for
    them go one to each replica."""
    library = Library([cluster.folder], index=cluster.folder.parent / "test-index.db")
    keys = {f"demo#{set_key(Request(tags), lambda n: library.resolve(n).subpath)}": tags for tags in SETS}

    def held() -> list[list[str]]:
        return [[keys[k] for k in r["placements"] if k in keys] for r in cluster_view(cluster.url)["replicas"]]

    if not all(held()):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda t: _post(cluster.url, {"prompt": f"warm {t}", **SMALL, "seed": 1}), SETS))
    first, second = held()
    only = [t for t in first if t not in second] or first, [t for t in second if t not in first] or second
    return [only[0][0], next(t for t in only[1] if t != only[0][0])]


def test_progress_and_interrupt_are_cluster_wide(cluster: Cluster) -> None:
    """Two long jobs, one per replica: /progress sees them, one /interrupt stops both."""
    long = [{"prompt": f"a long one {tags}", **SMALL, "steps": 150, "width": 192, "height": 192, "seed": i}
            for i, tags in enumerate(_one_set_per_replica(cluster))]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_post, cluster.url, b) for b in long]
        wait_for(lambda: sum(r["steps"] == 150 and r["step"] >= 1 and bool(r["started"])
                             for r in cluster_view(cluster.url)["replicas"]) == 2, 120, "both replicas sampling")
        progress = requests.get(f"{cluster.url}/sdapi/v1/progress", timeout=30).json()
        assert progress["state"]["job_count"] == 2 and 0 < progress["progress"] < 1
        assert requests.post(f"{cluster.url}/sdapi/v1/interrupt", timeout=30).json() == {}
        replies = [f.result() for f in futures]
    for reply in replies:
        assert any(n.startswith("interrupted after step") for n in _notes(reply)), _notes(reply)


def test_an_idempotency_key_never_makes_a_second_image(cluster: Cluster) -> None:
    body = {"prompt": "a key <lora:demo_style:0.6>", **SMALL, "seed": 21}
    served = _served(cluster.url)
    first = _post(cluster.url, body, headers={"x-request-id": "lorakit-test-key-1"})
    again = _post(cluster.url, body, headers={"x-request-id": "lorakit-test-key-1"})
    assert _images(first) == _images(again) and _served(cluster.url) == served + 1
    forced = {**body, "force_task_id": "task(lorakit-test-2)"}
    assert _images(_post(cluster.url, forced)) == _images(_post(cluster.url, forced)) == _images(first)
    assert _served(cluster.url) == served + 2
    other = _post(cluster.url, {**forced, "seed": 22})
    assert other.status_code == 409 and "already used for a different request" in other.json()["detail"]


def test_options_model_switch_rolls_over_every_replica(cluster: Cluster) -> None:
    api, ref = _api(cluster.url), _api(cluster.ref)
    r = requests.post(f"{cluster.url}/sdapi/v1/options", json={"sd_model_checkpoint": "broken"}, timeout=300)
    assert r.status_code == 422 and api.util_get_current_model() == "demo [eae2d4d6c3]"
    body = {"prompt": "a plain one", **SMALL, "seed": 4}
    api.util_set_model("tiny")
    ref.util_set_model("tiny")
    try:
        title = api.util_get_current_model()
        assert title.startswith("tiny [") and title == ref.util_get_current_model()
        assert _images(_post(cluster.url, body)) == _images(_post(cluster.ref, body))  # no half-switched cluster
        wait_for(lambda: all(r["model"]["entry_title"] == "tiny" for r in cluster_view(cluster.url)["replicas"]),
                 120, "every replica on the new model")
    finally:
        api.util_set_model("demo")
        ref.util_set_model("demo")
    assert api.util_get_current_model() == "demo [eae2d4d6c3]"


def test_refresh_loras_reaches_every_replica(cluster: Cluster) -> None:
    shutil.copy(EXAMPLES / "sunset_lokr.safetensors", cluster.folder / "sunset_lokr.safetensors")
    requests.post(f"{cluster.url}/sdapi/v1/refresh-loras", timeout=60).raise_for_status()
    assert "sunset_lokr" in {e["name"] for e in _api(cluster.url).get_loras()}
    bodies = [{"prompt": f"sun {i} <lora:sunset_lokr:0.{i + 5}>", **SMALL, "seed": i} for i in range(2)]
    assert all(_post(cluster.url, b).ok for b in bodies)


def test_a_replica_killed_mid_request_loses_nothing(cluster: Cluster) -> None:
    """The ingress retries what the dead replica had accepted on the other one, same seeds: every request
    answers 200 with the single server's image, and says it was retried; Serve replaces the replica."""
    bodies = [{"prompt": f"kill {SETS[i]}", **SMALL, "steps": 40, "seed": 50 + i} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_post, cluster.url, b) for b in bodies]
        victim = wait_for(lambda: next((r["replica"] for r in cluster_view(cluster.url)["replicas"]
                                        if r["started"] and r["step"] >= 2), None), 120, "a running job")
        cluster.ray.kill(replica_actor(cluster.ray, victim), no_restart=True)
        replies = [f.result() for f in futures]
    retried = [r for r in replies if any("retried on another replica" in n for n in _notes(r))]
    assert retried and "ActorDiedError" in _notes(retried[0])[-1]
    for body, reply in zip(bodies, replies):
        assert _images(reply) == _images(_post(cluster.ref, body))
    wait_for(lambda: running_replicas() == 2, 180, "Serve to replace the dead replica", every=1.0)
    assert _post(cluster.url, {"prompt": "after", **SMALL, "seed": 1}).ok


def test_downscaling_drains_what_the_replica_accepted(cluster: Cluster) -> None:
    """Scale 2 → 1 while 6 requests are in flight: the removed replica finishes its jobs (no retry needed)."""
    wait_for(lambda: len([r for r in cluster_view(cluster.url)["replicas"] if r["age_s"] < 2]) == 2, 120,
             "two replicas reporting")
    bodies = [{"prompt": f"drain {SETS[i]}", **SMALL, "steps": 80, "seed": 70 + i} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_post, cluster.url, b) for b in bodies]
        wait_for(lambda: sum(bool(r["job_count"]) for r in cluster_view(cluster.url)["replicas"]) == 2, 120,
                 "both replicas busy")
        for deployment in cluster.config["applications"][0]["deployments"]:
            if deployment["name"] == "LorakitModel":
                deployment["num_replicas"] = 1  # as an edited serve.yaml: in place, the removed replica drains
        deploy_config(cluster.config)
        replies = [f.result() for f in futures]
    assert all(r.status_code == 200 and not _notes(r) for r in replies), [r.text[:300] for r in replies]
    assert running_replicas() == 1
