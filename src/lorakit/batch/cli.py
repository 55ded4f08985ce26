"""``lorakit grid`` (X/Y/Z plots, ``--analyze-blocks``) and ``lorakit batch`` (a JSONL file of requests, locally or
on Ray). Axes, files and flags are checked before the model loads."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import BatchError, GridError, ModelError


def add_batch_commands(sub: Any) -> None:
    """Add ``grid`` and ``batch`` to the ``lorakit`` sub-parsers ``sub``."""
    _add_grid(sub)
    _add_batch(sub)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from ..cli import _add_device_args

    p.add_argument("-m", "--model", help="a diffusers model folder or a single-file checkpoint; default: the "
                                         "embedded demo model")
    p.add_argument("-l", "--lora-dir", action="append", help="LoRA folder (repeatable); also $LORAKIT_LORA_DIRS "
                                                             "or lora_dirs in lorakit.toml")
    p.add_argument("-e", "--embeddings-dir", action="append", help="textual-inversion embeddings folder")
    p.add_argument("--config", help="settings file (default ./lorakit.toml, then ~/.config/lorakit/config.toml)")
    _add_device_args(p)


def _add_grid(sub: Any) -> None:
    p = sub.add_parser("grid", help="X/Y/Z plot: images over up to three axes in one labelled PNG per Z value; "
                                    "--analyze-blocks ranks a LoRA's blocks by effect")
    p.add_argument("prompt", help="the prompt, LoRA tags included")
    for axis in "xyz":
        p.add_argument(f"--{axis}", metavar="KIND[:LORA]=VALUES",
                       help="an axis: lora:NAME, te:NAME, unet:NAME, lbw:NAME, prompt (S/R), seed, steps, cfg, "
                            "sampler, clip_skip; values comma-separated, ranges 0-1 [5] or 1-9 (+2)"
                       if axis == "x" else f"the {axis.upper()} axis (same syntax as --x)")
    p.add_argument("--analyze-blocks", metavar="LORA", help="instead of axes: generate with each block of LORA "
                                                            "lowered and rank the blocks by how much they change "
                                                            "the image")
    p.add_argument("--blocks", help="with --analyze-blocks: the blocks to test (IN04,M00,…; default: the LoRA's)")
    p.add_argument("--block-off", type=float, default=0.0, help="with --analyze-blocks: the weight a tested block "
                                                                "gets (default 0)")
    p.add_argument("--json", action="store_true", help="with --analyze-blocks: print the ranking as JSON")
    p.add_argument("-n", "--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, help="CFG scale (default 7)")
    p.add_argument("--sampler", help="sampler (default Euler a)")
    p.add_argument("--seed", type=int, help="seed of every cell (default: one random seed for the whole grid)")
    p.add_argument("-W", "--width", type=int, help="default: the model's native size (demo 64, SD1/SD2 512, SDXL 1024)")
    p.add_argument("-H", "--height", type=int, help="default: the model's native size")
    p.add_argument("--clip-skip", type=int, help="text-encoder layer from the end (default 1)")
    p.add_argument("--auto-triggers", action="store_true", help="add each LoRA's declared trigger words")
    p.add_argument("-o", "--output", default="grid.png", help="PNG path (with --z: OUT-01.png, OUT-02.png, …)")
    _add_model_args(p)
    p.set_defaults(func=_grid, verbose_default=False)


def _grid(args: argparse.Namespace) -> int:
    from ..generate.pipeline import Request
    from .axes import parse_axis
    from .common import Progress

    axes = [parse_axis(v, f"--{a}") if v else None for a, v in (("x", args.x), ("y", args.y), ("z", args.z))]
    if args.analyze_blocks and any(axes):
        raise GridError("--analyze-blocks makes its own grid: leave out --x, --y and --z")
    if not args.analyze_blocks and not any(axes):
        raise GridError("give at least one axis (--x, --y, --z) or --analyze-blocks LORA")
    base = Request(args.prompt, args.negative, args.steps, args.cfg, args.sampler, args.seed, args.width or 512,
                   args.height or 512, 1, args.clip_skip, args.auto_triggers)
    from ..files.output import check_writable
    from .grid import build_cells, check_size, run_grid

    count = 0
    if not args.analyze_blocks:  # counted, then the axes meet the prompt (Prompt S/R, withLora) before the model
        count = check_size(base, axes[0], axes[1], axes[2])
        build_cells(base, axes[0], axes[1], axes[2])
    check_writable(Path(args.output))  # a device, FIFO or folder: refused now, not after the last cell
    if count:
        print(f"grid: {count} cells", file=sys.stderr, flush=True)
    gen = _generator(args)
    native = gen.model.native_size  # a size not given is the model's own
    base = replace(base, width=args.width or native, height=args.height or native)
    try:
        if args.analyze_blocks:
            return _analyze(args, gen, base)
        run = run_grid(gen, base, axes[0], axes[1], axes[2], Path(args.output), Progress(count, "grid"))
    finally:
        gen.close()
    for path, layout in zip(run.paths, run.layouts):
        print(f"{path} ({layout.columns}×{layout.rows} cells, {layout.size[0]}×{layout.size[1]} px)")
    print(f"{len(run.order)} images, {run.switches} LoRA-set switches")
    return 0


def _analyze(args: argparse.Namespace, gen: Any, base: Any) -> int:
    from .analyze import analyze, lora_blocks, save_analysis
    from .common import Progress

    blocks = [b for b in args.blocks.split(",") if b.strip()] if args.blocks else None
    count = len(blocks) if blocks is not None else len(lora_blocks(gen, args.analyze_blocks))
    result = analyze(gen, base, args.analyze_blocks, blocks, args.block_off, Progress(count + 1, "analyze"))
    out = Path(args.output)
    save_analysis(result, out)
    print(json.dumps(result.as_dict(), indent=2) if args.json else f"{result.table()}\n{out}")
    return 0


def _generator(args: argparse.Namespace) -> Any:
    from ..generate.pipeline import Generator
    from ..library import EmbeddingIndex, Library
    from ..models.loading import load_model
    from ..settings import load_settings

    settings = load_settings(args.config)
    model = load_model(args.model or settings.model, **settings.device_options(args))
    model.pipe.set_progress_bar_config(disable=True)  # lorakit's bar counts cells, not one cell's steps
    embedding_dirs = args.embeddings_dir or settings.embedding_dirs
    return Generator(model, Library(args.lora_dir or settings.lora_dirs),
                     EmbeddingIndex(embedding_dirs) if embedding_dirs else None)


def _add_batch(sub: Any) -> None:
    p = sub.add_parser("batch", help="generate every request of a JSONL file (A1111 txt2img fields) into a folder, "
                                     "here or on Ray; a re-run skips finished items")
    p.add_argument("jobs", metavar="JOBS.jsonl", help="one JSON object a line: prompt, negative_prompt, seed, steps, "
                                                      "cfg_scale, sampler_name, width, height, batch_size, …")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the PNGs and results.jsonl")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="run on Ray (pip install 'lorakit[ray]'): "
                                                                          "a cluster's ADDRESS, or none to start "
                                                                          "one here")
    p.add_argument("--workers", type=int, help="with --ray: actors, each holding one model (default 1)")
    p.add_argument("--gpus-per-worker", type=float, help="with --ray: GPUs each actor takes (default 1 when the "
                                                         "model runs on CUDA here, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --ray: logical CPUs each actor "
                                                                      "reserves (default 1)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="sample up to N images of compatible requests (same size, steps, sampler, CFG) in one "
                        "UNet batch, each with its own LoRAs (default 8; 1: one by one, fused); on Ray too, with "
                        "the same batches as a local run")
    p.add_argument("--threads-per-worker", type=int, help="with --ray: torch CPU threads per actor (default: as "
                                                          "many as a local run uses, so images match it bit for "
                                                          "bit)")
    _add_model_args(p)
    p.set_defaults(func=_batch, verbose_default=False)


def _batch(args: argparse.Namespace) -> int:
    from ..generate.batched import DEFAULT_MAX_IMAGES
    from ..library import Library
    from ..settings import load_settings
    from .common import Progress
    from .jobs import check_loras, local_runner, read_jobs, run_batch

    items = read_jobs(args.jobs)
    settings = load_settings(args.config)
    lora_dirs = args.lora_dir or settings.lora_dirs
    if args.ray is None and any(v is not None for v in (args.workers, args.gpus_per_worker,
                                                         args.threads_per_worker)):
        raise BatchError("--workers, --gpus-per-worker and --threads-per-worker need --ray")
    max_batch = DEFAULT_MAX_IMAGES if args.max_batch is None else args.max_batch
    if max_batch < 1:
        raise BatchError(f"--max-batch must be at least 1, got {max_batch}")
    if args.ray is None or not args.ray or all(Path(d).is_dir() for d in lora_dirs):
        check_loras(items, Library(lora_dirs), args.jobs)  # a cluster's folders may exist only on its nodes
    progress = Progress(len(items), "batch")
    runner = _ray(args, settings, lora_dirs, max_batch) if args.ray is not None else \
        local_runner(lambda: _generator(args), progress, max_batch)
    summary = run_batch(items, Path(args.output), runner, progress)
    print(f"{summary.done} done, {summary.skipped} skipped (finished before), {summary.failed} failed; "
          f"{Path(args.output) / 'results.jsonl'}")
    return 2 if summary.failed else 0


def _ray(args: argparse.Namespace, settings: Any, lora_dirs: list[Any], max_batch: int) -> Any:
    import torch

    from .ray_runner import Pool, WorkerConfig, import_ray, ray_runner

    import_ray()  # a missing Ray is one clear line before anything starts
    workers = 1 if args.workers is None else args.workers
    if workers < 1 or args.cpus_per_worker <= 0:
        raise BatchError("--workers must be at least 1 and --cpus-per-worker more than 0")
    model = args.model or settings.model
    if not args.ray and model not in (None, "demo") and not Path(model).exists():  # a local Ray: check it here
        raise ModelError(f"{model}: no such model file or folder")
    options = settings.device_options(args)
    device = options.get("device", "auto")
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else \
        float(device.startswith("cuda") or device == "auto" and torch.cuda.is_available())
    config = WorkerConfig(model, options, [str(d) for d in lora_dirs],
                          [str(d) for d in (args.embeddings_dir or settings.embedding_dirs)],
                          args.threads_per_worker or torch.get_num_threads(), max_batch)
    return ray_runner(config, Pool(workers, args.cpus_per_worker, gpus, args.ray or None))
