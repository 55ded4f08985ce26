"""lorakit's overhead around bare diffusers, and the cost of step-wise LoRA weights.

1. The same generation, bare diffusers vs lorakit's Generator, with one LoRA fused: bare diffusers gets the prompt
   and negative prompt as text (its own encoding) with the LoRA already fused; lorakit parses the tags, resolves
   and applies the LoRA (already active from the previous request, as in a server), encodes the A1111 way and
   writes the infotext. On the demo model at 256 px, 8 steps, and on a full-size SD1.5 UNet + CLIP-L + VAE with
   random weights, 2 steps at 256 px. Overhead = lorakit / bare − 1 (target ≤ 2 %).
2. A step schedule (``unet=0@0,1@1``) run in hooks mode (strengths updated before each step) vs re-patching the
   fused weights before each step, vs a constant fused LoRA; with an attention-only rank-16 LoRA and a rank-32
   LoCon over every layer kohya reaches.

Run with nothing else busy:  python benchmarks/generate.py [--full-only | --tiny-only]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import best_of

from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.generate.samplers import scheduler_for
from lorakit.library import LoraIndex
from lorakit.models.loading import BaseModel, demo_model
from tests.factories import make_kohya_lora


def full_sd15() -> BaseModel:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from lorakit.generate.tokenizer import clip_tokenizer
    from lorakit.models.configs import SD_VAE, build_components

    torch.manual_seed(0)
    c = build_components("sd1", device="cpu")
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD_VAE).eval(), text_encoder=c["text_encoder"].eval(),
                                   tokenizer=clip_tokenizer(), unet=c["unet"].eval(), scheduler=scheduler_for("Euler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return BaseModel(pipe, "random-sd15", "0" * 10, "sd1")


def attention_only(path: str) -> str | None:
    return "lora" if ".attn" in path or "self_attn" in path else None


def overhead(model: BaseModel, steps: int, size: int, repeats: int) -> dict[str, float]:
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    tmp = Path(tempfile.mkdtemp())
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    save_file(make_kohya_lora(comps, attention_only, rank=16, seed=1), tmp / "style.safetensors")
    gen = Generator(model, LoraIndex([tmp]))
    req = Request("a cabin in the woods, (masterpiece:1.2) <lora:style:0.8>", "blurry", steps=steps, cfg=7.0,
                  sampler="Euler", seed=1, width=size, height=size)
    gen(req)  # warm-up; leaves the LoRA fused, as a server between requests

    def bare() -> None:
        with torch.no_grad():
            pipe(prompt="a cabin in the woods, (masterpiece:1.2)", negative_prompt="blurry", num_inference_steps=steps,
                 guidance_scale=7.0, width=size, height=size, generator=torch.Generator().manual_seed(1))

    def ours() -> None:
        gen(req)

    t_bare, t_ours = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        t_bare.append(best_of(1, bare))
        t_ours.append(best_of(1, ours))
    gen.close()
    b, o = min(t_bare), min(t_ours)
    return {"bare_s": b, "lorakit_s": o, "overhead_pct": (o / b - 1) * 100}


def schedule_cost(model: BaseModel, steps: int, size: int, targets: object = attention_only,
                  rank: int = 16) -> dict[str, float]:
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    tmp = Path(tempfile.mkdtemp())
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    save_file(make_kohya_lora(comps, targets, rank=rank, seed=2), tmp / "s.safetensors")  # type: ignore[arg-type]
    gen = Generator(model, LoraIndex([tmp]))
    base = dict(steps=steps, cfg=7.0, sampler="Euler", seed=1, width=size, height=size)
    out: dict[str, float] = {}
    for label, prompt in (("constant_fused", "a cabin <lora:s:1>"), ("scheduled_hooks", "a cabin <lora:s:unet=0@0,1@1>")):
        gen(Request(prompt, **base))  # type: ignore[arg-type]
        t = time.perf_counter()
        gen(Request(prompt, **base))  # type: ignore[arg-type]
        out[label] = time.perf_counter() - t
    ref_prompt = "a cabin <lora:s:unet=0@0,1@1>"
    original_apply = gen._apply

    def fused_every_step(refs, loras, n, step):  # type: ignore[no-untyped-def]
        pairs = [(l, r.spec(step or 1, n)) for r, l in zip(refs, loras)]
        gen.patcher.set(pairs, mode="fused", log_reports=False)

    gen._apply = fused_every_step  # type: ignore[method-assign]
    gen(Request(ref_prompt, **base))  # type: ignore[arg-type]
    t = time.perf_counter()
    gen(Request(ref_prompt, **base))  # type: ignore[arg-type]
    out["scheduled_repatch_fused"] = time.perf_counter() - t
    gen._apply = original_apply  # type: ignore[method-assign]
    gen.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--full-only", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the full-size overhead run")
    ap.add_argument("--skip-schedule", action="store_true")
    args = ap.parse_args()
    if not args.full_only:
        tiny = demo_model()
        print("demo model, 256 px, 8 steps:", {k: round(v, 4) for k, v in overhead(tiny, 8, 256, 5).items()})
        if not args.skip_schedule:
            print("demo model schedule, 256 px, 8 steps:",
                  {k: round(v, 3) for k, v in schedule_cost(tiny, 8, 256).items()})
    if not args.tiny_only:
        t = time.perf_counter()
        full = full_sd15()
        print(f"built random full-size SD1.5 in {time.perf_counter() - t:.1f} s")
        print("full SD1.5, 256 px, 2 steps:",
              {k: round(v, 4) for k, v in overhead(full, 2, 256, args.repeats).items()})
        if args.skip_schedule:
            return
        print("full SD1.5 schedule, attention rank 16, 256 px, 4 steps:",
              {k: round(v, 3) for k, v in schedule_cost(full, 4, 256).items()})
        from switch import kohya_targets

        print("full SD1.5 schedule, LoCon rank 32, 256 px, 4 steps:",
              {k: round(v, 3) for k, v in schedule_cost(full, 4, 256, kohya_targets, 32).items()})


if __name__ == "__main__":
    main()
