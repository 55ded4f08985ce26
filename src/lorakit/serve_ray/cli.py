"""``lorakit serve``'s Ray flags, and the ``ClusterConfig`` they make — checked before Ray starts (a bad flag is one
line, exit 2). Without ``--ray`` nothing here imports Ray."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config import ClusterConfig, ServeConfigError, parse_autoscale

RAY_ONLY = ("replicas", "autoscale", "address", "replica_gpus", "sets_per_replica", "max_ongoing")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve", "serve past one machine: one model replica per device, requests routed "
                                          "by LoRA set (docs/serving.md; needs pip install 'lorakit[ray]')")
    g.add_argument("--ray", action="store_true", help="run on Ray Serve (the same API and page)")
    g.add_argument("--replicas", type=int, metavar="N", help="model replicas (default 2)")
    g.add_argument("--autoscale", metavar="MIN:MAX", help="scale model replicas with the load, MIN to MAX")
    g.add_argument("--address", metavar="ADDR", help="an existing Ray cluster: auto (this node's), host:port or "
                   "ray://host:10001; default: start Ray on this machine")
    g.add_argument("--replica-gpus", type=float, metavar="G", help="GPUs per model replica (default 1 where Ray "
                   "sees GPUs, else 0: CPU threads)")
    g.add_argument("--sets-per-replica", type=int, metavar="K", help="LoRA sets a replica keeps placed (default 4)")
    g.add_argument("--max-ongoing", type=int, metavar="N", help="requests in flight per replica before its sets "
                   "spill to another (default 2 × --max-batch): the affinity/latency knob")
    g.add_argument("--write-serve-config", metavar="FILE", help="write a Serve config file (serve deploy / KubeRay "
                   "RayService serveConfigV2) for these flags and exit")


def check_ray_flags(args: argparse.Namespace) -> None:
    """Ray-only flags need ``--ray`` (or ``--write-serve-config``); one way to scale."""
    given = [f"--{name.replace('_', '-')}" for name in RAY_ONLY if getattr(args, name, None) is not None]
    if given and not (args.ray or args.write_serve_config):
        raise ServeConfigError(f"{', '.join(given)} need --ray")
    if args.replicas is not None and args.autoscale is not None:
        raise ServeConfigError("give either --replicas or --autoscale, not both")


def cluster_config(args: argparse.Namespace, settings: Any) -> ClusterConfig:
    """The deployment the flags describe (paths made absolute: replicas may start in another folder)."""
    def absolute(paths: Any) -> list[str]:
        return [_resolved(p) for p in paths or []]

    model = args.model or settings.model
    if model not in (None, "demo") and Path(str(model)).expanduser().exists():
        model = _resolved(str(model))
    return ClusterConfig(
        model=None if model == "demo" else model, lora_dirs=absolute(args.lora_dir or settings.lora_dirs),
        embedding_dirs=absolute(args.embeddings_dir or settings.embedding_dirs),
        models_dirs=absolute(args.models_dir), device_options=settings.device_options(args),
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, auto_triggers=args.auto_triggers,
        api_auth=args.api_auth, replicas=args.replicas if args.replicas is not None else 2,
        autoscale=parse_autoscale(args.autoscale) if args.autoscale is not None else None,
        replica_gpus=args.replica_gpus or 0.0, max_ongoing_requests=args.max_ongoing or 0,
        sets_per_replica=args.sets_per_replica or ClusterConfig.sets_per_replica,
        options_file=_resolved(args.options_file) if args.options_file else None)


def _resolved(path: str) -> str:
    """``path`` made absolute, its symlinks resolved; a symlink loop is a ``ServeConfigError`` (``resolve()`` raises
    RuntimeError there)."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        raise ServeConfigError(f"{path}: a symlink that loops; name the folder itself") from None


def ray_serve(args: argparse.Namespace) -> int:
    """``lorakit serve --ray`` (or ``--write-serve-config``): check, then deploy and serve until Ctrl+C."""
    from ..files.output import write_atomic
    from ..server.app import listen
    from ..settings import load_settings

    check_ray_flags(args)
    cfg = cluster_config(args, load_settings(args.config))
    if not args.address:  # the paths must exist here; on a cluster they are the nodes' (a shared path)
        for folder in [*cfg.lora_dirs, *cfg.embedding_dirs, *cfg.models_dirs]:
            if not Path(folder).is_dir():
                raise ServeConfigError(f"{folder}: folder does not exist")
        if cfg.model is not None and not Path(cfg.model).exists():
            raise ServeConfigError(f"{cfg.model}: no such model file or folder")
    if args.write_serve_config:
        from .run import serve_config

        text = serve_config(cfg, args.host, args.port)
        write_atomic(args.write_serve_config, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # never a FIFO
        print(f"wrote {args.write_serve_config}: serve deploy {args.write_serve_config} (docs/serving.md)")
        return 0
    try:
        listen(args.host, args.port).close()  # a port in use is one line now, not a Serve proxy failing later
    except OSError as e:
        raise ServeConfigError(f"port {args.port} cannot be opened on {args.host}: {e.strerror or e}") from None
    from .run import serve_forever

    return serve_forever(cfg, args.host, args.port, args.address, args.replica_gpus)
