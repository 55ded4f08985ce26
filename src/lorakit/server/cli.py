"""``lorakit serve``: the command line of the server (``add_serve_command`` registers it). Every flag and the
options file are checked before the port is opened and the model loads; an error after the port is open closes
it again."""
from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_serve_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                      add_device_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("serve", help="A1111-compatible HTTP API (/sdapi/v1) and a web page to browse LoRAs")
    p.add_argument("-m", "--model", help="a diffusers model folder or single file; default: the embedded demo model")
    p.add_argument("-l", "--lora-dir", action="append", help="LoRA folder (repeatable); also $LORAKIT_LORA_DIRS "
                                                             "or lora_dirs in lorakit.toml")
    p.add_argument("-e", "--embeddings-dir", action="append", help="textual-inversion embeddings folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    p.add_argument("--api-auth", help="USER:PASSWORD: require HTTP basic auth for the API and the page")
    p.add_argument("--auto-triggers", action="store_true", help="add each LoRA's declared trigger words that the "
                                                                "prompt lacks (off by default)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="sample up to N images of waiting txt2img requests in one UNet batch, each with its own "
                        "LoRAs (requests sharing size, steps, sampler and CFG; default 1: one by one, fused)")
    p.add_argument("--batch-window-ms", type=float, default=50.0, metavar="MS",
                   help="with --max-batch: how long the first waiting request waits for others (default 50)")
    p.add_argument("--models-dir", action="append", metavar="DIR", help="folder of checkpoints (single files and "
                   "diffusers folders, recursively) that API clients may switch to (repeatable)")
    p.add_argument("--options-file", metavar="FILE", help="where options posted to /sdapi/v1/options are saved and "
                   "read back at start (default ~/.config/lorakit/server-options.json)")
    p.add_argument("--config", help="settings file (default ./lorakit.toml, then ~/.config/lorakit/config.toml)")
    add_device_args(p)
    from ..serve_ray.cli import add_ray_args

    add_ray_args(p)
    p.set_defaults(func=serve, verbose_default=False)


def serve(args: argparse.Namespace) -> int:
    import errno

    from ..files.output import check_target
    from ..server.models import DEFAULT_OPTIONS_FILE
    from ..serve_ray.cli import check_ray_flags
    from ..server.worker import check_batching
    from .app import listen

    check_batching(args.max_batch, args.batch_window_ms)
    options_file = Path(args.options_file).expanduser() if args.options_file is not None else DEFAULT_OPTIONS_FILE
    check_target(options_file)  # /sdapi/v1/options saves there: a device, FIFO or folder is refused now
    if not 0 <= args.port <= 65535:  # with --ray too (bind() raised OverflowError there)
        print(f"lorakit serve: port {args.port} cannot be opened: a port is 0…65535", file=sys.stderr)
        return 2
    if args.ray or args.write_serve_config:
        from ..serve_ray.cli import ray_serve

        return ray_serve(args)
    check_ray_flags(args)
    try:  # before the model loads: a port in use is one line at once, not a traceback after "serving on …"
        sock = listen(args.host, args.port)
    except OSError as e:
        problem = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be opened on {args.host}: {e.strerror or e}"
        print(f"lorakit serve: port {args.port} {problem}", file=sys.stderr)
        return 2
    try:
        return _run(args, sock, options_file)
    finally:
        sock.close()


def _run(args: argparse.Namespace, sock: socket.socket, options_file: Path) -> int:
    import uvicorn

    from ..library import EmbeddingIndex, Library
    from ..models.loading import load_model
    from ..settings import load_settings
    from .app import create_app
    from .models import ModelCatalog, entry_for
    from .state import saved_model

    settings = load_settings(args.config)
    dirs = args.lora_dir or settings.lora_dirs
    embedding_dirs = args.embeddings_dir or settings.embedding_dirs
    library = Library(dirs)
    print(f"{len(library.entries)} LoRAs in {', '.join(str(d) for d in dirs) or '(no folder)'} "
          f"({library.last_scan['seconds']:.2f} s)")
    models_dirs = [Path(d) for d in args.models_dir or []]
    spec = args.model or settings.model
    catalog = ModelCatalog(models_dirs, entry_for(spec, models_dirs))
    saved = saved_model(options_file, catalog) if not args.model else None
    if saved is not None:  # as A1111: the model last chosen through the API, unless --model says otherwise
        spec = saved.spec
        catalog.current = saved
    device_options: dict[str, Any] = settings.device_options(args)
    model = load_model(spec, **device_options)
    print(f"model {model.describe()}")
    app = create_app(model, library, EmbeddingIndex(embedding_dirs) if embedding_dirs else None, args.api_auth,
                     args.auto_triggers, args.max_batch, args.batch_window_ms, catalog, options_file,
                     lambda s: load_model(s, **device_options))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_auth:
        print(f"warning: listening on {args.host} without --api-auth: anyone who reaches it can generate")
    port = sock.getsockname()[1]
    print(f"lorakit: serving the page and the A1111 API on http://{args.host}:{port}/ (Ctrl+C stops)", flush=True)
    logging.getLogger("lorakit.server").setLevel(logging.INFO)  # one line per request, -v or not
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="warning")).run(sockets=[sock])
    return 0
