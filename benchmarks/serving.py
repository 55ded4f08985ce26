"""Serving throughput with many LoRA sets: 8 queued requests, each with its own LoRA set, run

1. one by one, fused (what A1111 / ComfyUI / diffusers do: re-patch the weights between requests; lorakit's
   default ``Generator`` path, switching only what changes),
2. one by one, hooks (no weight changes; the reference each batched image is held to),
3. batched: one UNet batch, each sample with its own LoRA set (``Generator.run_batch``).

Images/s of each (best of ``--repeats``), and the largest pixel difference of the batched images from the same
requests alone in hooks mode and fused. Models: ``demo-arch`` (the demo model's architecture with random weights:
64 px → 16×16 latents, per-call overhead dominates), ``tiny`` (the tests' tiny SD1 pipeline: its 2× VAE makes 64 px
a 32×32 latent, self-attention over 1,024 tokens dominates), ``sd15`` (full-size SD1.5 UNet + CLIP-L + VAE with
random weights), ``demo`` (the embedded demo model, trained weights). LoRAs: one file per request, rank 16 over every attention layer of UNet and text encoder
(``--locon``: rank 16 over every Linear/Conv of the UNet too).

Run with nothing else busy:  OMP_NUM_THREADS=1 python benchmarks/serving.py --model sd15 --size 128 --steps 4
On a GPU (``benchmarks/gpu_session.sh`` runs it):  python benchmarks/serving.py --model sd15 --size 512 --steps 8
--device cuda
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import best_of

from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request, Result
from lorakit.keymap.arch import Arch
from lorakit.library import Library
from lorakit.models.loading import BaseModel, demo_model
from tests.factories import make_kohya_lora, tiny_sd1_pipeline

PROMPTS = ["a red circle", "a blue star on the left", "two yellow squares", "a green triangle", "a pink diamond",
           "a white star on a black background", "an orange circle", "a purple square"]


def model_named(name: str) -> BaseModel:
    if name == "demo":
        return demo_model()
    if name == "tiny":
        return BaseModel(tiny_sd1_pipeline(), "tiny", "0" * 10, Arch.UNKNOWN)
    if name == "demo-arch":
        return demo_architecture()
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from lorakit.generate.samplers import scheduler_for
    from lorakit.generate.tokenizer import clip_tokenizer
    from lorakit.models.configs import SD_VAE, build_components

    torch.manual_seed(0)
    c = build_components("sd1", device="cpu")
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD_VAE).eval(), text_encoder=c["text_encoder"].eval(),
                                   tokenizer=clip_tokenizer(), unet=c["unet"].eval(), scheduler=scheduler_for("Euler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return BaseModel(pipe, "random-sd15", "0" * 10, Arch.SD1)


def demo_architecture() -> BaseModel:
    """The demo model's architecture (64 px → 16×16 latents) with random weights: speed does not depend on them."""
    from diffusers import StableDiffusionPipeline

    from lorakit.demo.weights import build
    from lorakit.generate.samplers import scheduler_for
    from lorakit.generate.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    c = {k: m.eval() for k, m in build().items()}
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=clip_tokenizer(),
                                   unet=c["unet"], scheduler=scheduler_for("Euler a"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return BaseModel(pipe, "demo-arch", "0" * 10, Arch.UNKNOWN)


def targets(locon: bool) -> Callable[[str], str | None]:
    def kind(path: str) -> str | None:
        attention = ".attn" in path or "self_attn" in path
        return "lora" if attention or locon and path.startswith("unet") else None
    return kind


def requests(model: BaseModel, folder: Path, n: int, steps: int, size: int, locon: bool) -> list[Request]:
    comps = {"unet": model.pipe.unet, "text_encoder": model.pipe.text_encoder}
    for i in range(n):
        save_file(make_kohya_lora(comps, targets(locon), rank=16, seed=i + 1), folder / f"style{i}.safetensors", {})
    return [Request(f"{PROMPTS[i % len(PROMPTS)]} <lora:style{i}:{0.5 + 0.05 * i:.2f}>", "blurry", steps=steps,
                    cfg=7.0, sampler="Euler a", seed=100 + i, width=size, height=size) for i in range(n)]


def pixels(results: list[Any]) -> list[np.ndarray]:
    out = []
    for r in results:
        if not isinstance(r, Result):
            raise SystemExit(f"a request failed: {r}")
        out += [np.asarray(im.convert("RGB")).astype(np.int16) for im in r.images]
    return out


def max_diff(a: list[Any], b: list[Any]) -> int:
    return max(int(np.abs(x - y).max()) for x, y in zip(pixels(a), pixels(b)))


def run(model: BaseModel, library: Library, reqs: list[Request], repeats: int) -> dict[str, Any]:
    model.pipe.set_progress_bar_config(disable=True)
    gen = Generator(model, library)
    out: dict[str, Any] = {}
    got: dict[str, list[Any]] = {}

    def one_by_one(mode: str) -> Callable[[], None]:
        def go() -> None:
            gen.lora_mode = mode
            got[mode] = [gen(r) for r in reqs]
        return go

    def batched() -> None:
        got["batched"] = gen.run_batch(reqs, max_images=len(reqs))

    for name, fn in (("fused", one_by_one("fused")), ("hooks", one_by_one("hooks")), ("batched", batched)):
        fn()  # warm-up: LoRA files loaded and placed, schedulers built
        seconds = best_of(repeats, fn)
        out[name] = {"seconds": round(seconds, 3), "images_per_s": round(len(reqs) / seconds, 3)}
    gen.close()
    out["batched_vs_fused"] = round(out["fused"]["seconds"] / out["batched"]["seconds"], 2)
    out["batched_vs_hooks"] = round(out["hooks"]["seconds"] / out["batched"]["seconds"], 2)
    out["max_px_diff_vs_hooks_alone"] = max_diff(got["batched"], got["hooks"])
    out["max_px_diff_vs_fused_alone"] = max_diff(got["batched"], got["fused"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "demo-arch", "sd15", "demo"), default="demo-arch")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--locon", action="store_true", help="LoRAs over every UNet Linear/Conv, not only attention")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps")
    ap.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA/MPS, fp32 on the CPU), fp16, bf16, fp32")
    args = ap.parse_args()
    model = model_named(args.model)
    if args.device != "cpu" or args.dtype != "auto":
        from lorakit.models.device import resolve_device, resolve_dtype
        from lorakit.models.loading import place_model

        device = resolve_device(args.device)
        model = place_model(model, device, resolve_dtype(args.dtype, device))
    folder = Path(tempfile.mkdtemp())
    reqs = requests(model, folder, args.requests, args.steps, args.size, args.locon)
    start = time.perf_counter()
    result = run(model, Library([folder], index=folder / "index.sqlite3"), reqs, args.repeats)
    result.update(model=args.model, size=args.size, steps=args.steps, requests=args.requests, locon=args.locon,
                  device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
                  threads=torch.get_num_threads(), total_s=round(time.perf_counter() - start, 1))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
