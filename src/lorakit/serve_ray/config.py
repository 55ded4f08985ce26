"""What a Ray Serve deployment of lorakit is made of, as plain values (they travel to every replica), and the Serve
options each deployment gets from them. Nothing here imports Ray: the CLI checks its flags before Ray starts.

Choices (``docs/serving.md`` explains them):
- ``max_ongoing_requests`` is the affinity/latency knob: a replica that holds a request's LoRA set keeps getting
  that set's requests until it has this many in flight; only then do they spill to another replica. Default
  ``2 × max_batch`` (at least 2): one batch running, one collecting — the GPU never waits, the queue stays short.
- ``sets_per_replica`` (K) defaults to lorakit's plan cache (``patch.plan.PLANS_KEEP`` = 4): a set still among a
  replica's K recent sets switches back without rebuilding anything.
- ``graceful_shutdown_timeout_s`` (default 600 s) must exceed the longest queue drain (``max_ongoing_requests`` ×
  the slowest job), so that a replica removed by downscaling or an update finishes what it accepted.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LorakitError
from ..files.inputs import MAX_JSON_DEPTH, loads_bounded
from ..patch.plan import PLANS_KEEP

APP_NAME = "lorakit"
AUTOSCALE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_REPLICAS = 1024
MAX_ONGOING = 2 ** 31 - 1  # Serve keeps max_ongoing_requests in an int32 (a larger one fails at deploy)
RESOURCE_STEP = 1e-4  # Ray's finest fraction of a CPU or GPU


class ServeConfigError(LorakitError):
    """A flag or config value of ``lorakit serve --ray`` that cannot work (one line, exit 2)."""


@dataclass(frozen=True)
class ClusterConfig:
    """Everything the ingress and the model replicas need, as plain values (JSON-able: a Serve config file's
    ``args`` are this)."""

    model: str | None = None  # a path every replica can read; None: the embedded demo model
    lora_dirs: list[str] = field(default_factory=list)  # folders every replica can read (a shared path)
    embedding_dirs: list[str] = field(default_factory=list)
    models_dirs: list[str] = field(default_factory=list)  # checkpoints clients may switch to (shared paths)
    library_index: str | None = None  # each process's LoRA index (None: ~/.cache/lorakit on its node)
    device_options: dict[str, str] = field(default_factory=dict)
    threads: int = 0  # torch threads per replica; 0: Ray's (its CPUs)
    max_batch: int = 1
    batch_window_ms: float = 50.0
    auto_triggers: bool = False
    api_auth: str | None = None
    replicas: int = 2  # fixed replica count, unless ``autoscale``
    ingress_replicas: int = 1  # HTTP ingress replicas (2 or more on a cluster: no single point of failure)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 0  # 0: 2 × max_batch, at least 2
    sets_per_replica: int = PLANS_KEEP
    retries: int = 3  # of a request whose replica died, on another replica, before a 503
    request_timeout_s: float = 1800.0  # a request not answered in this time is a 503 (never a hang)
    graceful_shutdown_timeout_s: float = 600.0
    routing: str = "affinity"  # "plain": no multiplexed id (Serve's pow-2 routing; for comparisons)
    options_file: str | None = None  # where the job table saves posted options (a path on its node)

    def __post_init__(self) -> None:
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1 or high > MAX_REPLICAS:
                raise ServeConfigError(f"--autoscale MIN:MAX needs 0 ≤ MIN ≤ MAX, 1 ≤ MAX ≤ {MAX_REPLICAS}; "
                                       f"got {low}:{high}")
        elif not 1 <= self.replicas <= MAX_REPLICAS:
            raise ServeConfigError(f"--replicas must be 1 to {MAX_REPLICAS}, got {self.replicas}")
        if self.routing not in ("affinity", "plain"):
            raise ServeConfigError(f"routing must be affinity or plain, got {self.routing!r}")
        if self.api_auth is not None and ":" not in self.api_auth:
            raise ServeConfigError("--api-auth must be USER:PASSWORD")
        if not 1 <= self.ingress_replicas <= MAX_REPLICAS:
            raise ServeConfigError(f"ingress_replicas must be 1 to {MAX_REPLICAS}, got {self.ingress_replicas}")
        if self.sets_per_replica < 1 or self.retries < 0 or self.max_ongoing_requests < 0:
            raise ServeConfigError("sets_per_replica must be ≥ 1, retries and max_ongoing_requests ≥ 0")
        if self.max_ongoing_requests > MAX_ONGOING:
            raise ServeConfigError(f"--max-ongoing must be at most {MAX_ONGOING}, got {self.max_ongoing_requests}")
        _check_resource("--replica-gpus", self.replica_gpus)
        _check_resource("replica_cpus", self.replica_cpus)

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or max(2, 2 * self.max_batch)

    def as_args(self) -> dict[str, Any]:
        """The config as JSON-able values (a Serve config file's ``args``)."""
        out = asdict(self)
        out["autoscale"] = list(self.autoscale) if self.autoscale else None
        return out

    def replica_args(self) -> dict[str, Any]:
        """``as_args`` without the scale (replica counts, resources, drain time): what the ingress and replicas are
        built with. Scaling the deployment then changes no constructor argument, so Serve scales in place (and
        drains the replicas it removes) instead of replacing every replica."""
        scale = ("replicas", "autoscale", "ingress_replicas", "replica_cpus", "replica_gpus",
                 "graceful_shutdown_timeout_s", "max_ongoing_requests")
        return {k: v for k, v in self.as_args().items() if k not in scale}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ClusterConfig":
        """The config from a Serve config file's ``args`` (unknown keys refused, naming them)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ServeConfigError(f"unknown lorakit serve args: {', '.join(unknown)} "
                                   f"(known: {', '.join(sorted(known))})")
        values = {k: _coerce(k, str(cls.__dataclass_fields__[k].type), v) for k, v in args.items()}
        if values.get("autoscale") is not None:
            values["autoscale"] = tuple(values["autoscale"])
        return cls(**values)


def _check_resource(name: str, value: float) -> None:
    """A replica's CPUs or GPUs as Ray takes them: a finite number ≥ 0, 0 or at least Ray's step (1e-4), at most
    ``MAX_REPLICAS`` (checked here: Ray would refuse NaN, inf, negatives and finer fractions only after it started,
    with a traceback)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value == 0 or
                                                                        RESOURCE_STEP <= value <= MAX_REPLICAS)
    if not ok or abs(value / RESOURCE_STEP - round(value / RESOURCE_STEP)) > 1e-6:
        raise ServeConfigError(f"{name} must be a number from 0 to {MAX_REPLICAS} in steps of {RESOURCE_STEP:g} "
                               f"(Ray's finest fraction), got {value!r}")


def _coerce(name: str, kind: str, value: Any) -> Any:
    """A text value (``serve run lorakit.serve_ray.deployments:app_builder max_batch=4 lora_dirs=/a,/b``) as the
    field's type; other values as they are."""
    if not isinstance(value, str) or kind.startswith("str"):
        return value
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if kind.startswith("list"):
            return [part for part in value.split(",") if part]
        if kind.startswith("tuple"):
            return parse_autoscale(value)
        if kind.startswith("dict"):
            return dict(loads_bounded(value, MAX_JSON_DEPTH))
    except (ValueError, TypeError) as e:
        raise ServeConfigError(f"lorakit serve arg {name}={value!r}: not a {kind} ({e})") from None
    return value


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` → (MIN, MAX); a one-line ``ServeConfigError`` otherwise."""
    m = AUTOSCALE.match(text)
    if not m:
        raise ServeConfigError(f"--autoscale must be MIN:MAX (whole numbers, e.g. 1:4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def model_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Serve options of the model deployment: one replica = one model on one device."""
    scale: dict[str, Any]
    if cfg.autoscale is not None:
        scale = {"autoscaling_config": {"min_replicas": cfg.autoscale[0], "max_replicas": cfg.autoscale[1],
                                        "initial_replicas": max(1, cfg.autoscale[0]),
                                        "target_ongoing_requests": max(1, cfg.max_batch)}}
    else:
        scale = {"num_replicas": cfg.replicas}
    actor: dict[str, Any] = {"num_cpus": cfg.replica_cpus}
    if cfg.replica_gpus:
        actor["num_gpus"] = cfg.replica_gpus
    return {**scale, "ray_actor_options": actor, "max_ongoing_requests": cfg.ongoing,
            "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s, "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 5.0, "health_check_timeout_s": 60.0}


def ingress_options(cfg: ClusterConfig) -> dict[str, Any]:
    """The HTTP ingress: CPU only, no logical CPU reserved (a 2-core machine must still place the replicas), many
    requests each (they only wait on the replicas)."""
    return {"num_replicas": cfg.ingress_replicas, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1000,
            "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s + 60}


def table_options() -> dict[str, Any]:
    """The job table: one replica (the cluster's progress, stop flags, options, idempotency keys)."""
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 10_000}
