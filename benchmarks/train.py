"""Training speed: lorakit's training step side by side with a plain diffusers + PEFT LoRA step (the
``train_text_to_image_lora`` recipe: rank r, α = r, attention projections to_q/to_k/to_v/to_out.0 of the UNet,
AdamW, MSE on ε) on the same model, the same latents, in one process.

Both train exactly the same layers (lorakit with ``--train unet --only-layers to_q,to_k,to_v,to_out.0``); the text
encoder runs without gradients in both. Reports seconds per step (median after a warm-up), the ratio, and on CUDA
the peak memory of a step over the model. Also lorakit's own default (every transformer layer, UNet + text
encoder) for reference.

    python benchmarks/train.py                           # the demo model on the CPU (seconds)
    python benchmarks/train.py --model sd1 --steps 3     # full-size SD1.5 shapes, random weights, 512 px
    python benchmarks/train.py --model sd1 --device cuda --dtype fp16 --steps 20
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import PeakRss  # also puts the repository on sys.path

from lorakit.keymap.arch import Arch
from lorakit.models.device import resolve_device, resolve_dtype
from lorakit.models.loading import BaseModel, load_model
from lorakit.train import diffusion as dif
from lorakit.train.loop import TrainConfig, Trainer
from lorakit.train.network import NetworkSpec

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_for(name: str, device: torch.device, dtype: torch.dtype) -> BaseModel:
    if name == "demo":
        return load_model(None, device=str(device), dtype=dtype)
    from diffusers import AutoencoderKL, DDPMScheduler

    from lorakit.models.configs import SD_VAE, build_components
    from lorakit.models.single_file import _assemble

    torch.manual_seed(0)
    c = build_components("sd1", device=str(device))
    with torch.device(device):
        vae = AutoencoderKL(**SD_VAE)
    pipe = _assemble("sd1", c["unet"].eval(), vae.eval(), [c["text_encoder"].eval()])
    pipe.scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe.to(device, dtype)
    return BaseModel(pipe, "sd1-random", "0" * 10, Arch.SD1, device, dtype)


def images(folder: Path, size: int, n: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a blue square")
    return folder


def timed_steps(step: Any, n: int, device: torch.device) -> tuple[float, float | None]:
    """(median seconds per step after one warm-up, peak CUDA bytes of the steps over what was allocated before)."""
    step()
    sync(device)
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = None if base is None else torch.cuda.max_memory_allocated(device) - base
    return statistics.median(times), peak


def lorakit_step(model: BaseModel, data: Path, rank: int, only: tuple[str, ...], train: str, size: int,
                 steps: int) -> tuple[float, float | None, int]:
    spec = NetworkSpec("lora", rank, float(rank), train=train, only=only)
    cfg = TrainConfig(data, Path(tempfile.mkdtemp()) / "b.safetensors", network=spec, steps=10_000, resolution=size,
                      te_lr=1e-4)
    trainer = Trainer(cfg, model)
    trainer.net.attach()
    try:
        sec, peak = timed_steps(trainer.train_step, steps, model.device)
    finally:
        trainer.net.detach()
    return sec, peak, len(trainer.net.leaves)


def peft_step(model: BaseModel, rank: int, size: int, steps: int) -> tuple[float, float | None, int]:
    """diffusers' recipe: ``unet.add_adapter(LoraConfig(...))``, AdamW on the LoRA parameters, MSE on ε."""
    from peft import LoraConfig

    pipe, device, dt = model.pipe, model.device, model.dtype
    unet = pipe.unet
    plain = {n: m for n, m in unet.named_modules() if n.endswith(ATTN)}  # PEFT wraps them; put back after
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(ATTN)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # diffusers' script: trainable LoRA parameters in fp32 (cast_training_params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    schedule = dif.NoiseSchedule.from_scheduler(pipe.scheduler)
    ids = pipe.tokenizer(["a photo of a blue square"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    gen = torch.Generator().manual_seed(0)
    down = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # the VAE's factor: 8 for SD, 4 for the demo model
    x0 = torch.randn((1, 4, size // down, size // down), generator=gen).to(device)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and dt == torch.float16 else None

    def step() -> None:
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (1,), generator=gen).to(device)
        noisy = dif.add_noise(schedule, x0, noise, t)
        pred = unet(noisy.to(dt), t, encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)

    try:
        sec, peak = timed_steps(step, steps, device)
    finally:
        unet.delete_adapters(unet.active_adapters())
        for name, module in plain.items():  # the wrappers stay after delete_adapters: the plain layers back
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, module)
    return sec, peak, len(plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["demo", "sd1"], default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peft-first", action="store_true",
                    help="measure PEFT before lorakit's same-layer run (the order's share of the memory ratio)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    size = 64 if args.model == "demo" else 512
    t0 = time.perf_counter()
    model = model_for(args.model, device, dtype)
    data = images(Path(tempfile.mkdtemp()), size)
    rows = []

    def measured(run: Any) -> tuple[float, float | None, int]:
        """CUDA: the steps' peak allocated bytes; CPU: the peak RSS over the RSS before the method (adapters,
        optimizer state, warm-up and steps), sampled every 2 ms after ``malloc_trim``."""
        if device.type == "cuda":
            return run()  # type: ignore[no-any-return]
        gc.collect()
        with PeakRss() as mem:
            sec, _, n = run()
        return sec, float(mem.peak_over), n

    import peft  # noqa: F401 — one-time costs (imports, allocator growth, thread pools) paid before any measurement

    lorakit_step(model, data, args.rank, (), "both", size, 1)
    if args.peft_first:
        sec_p, peak_p, n_p = measured(lambda: peft_step(model, args.rank, size, args.steps))
    sec_l, peak_l, n_l = measured(lambda: lorakit_step(model, data, args.rank, ATTN, "unet", size, args.steps))
    if not args.peft_first:
        sec_p, peak_p, n_p = measured(lambda: peft_step(model, args.rank, size, args.steps))
    sec_d, peak_d, n_d = measured(lambda: lorakit_step(model, data, args.rank, (), "both", size, args.steps))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mib = (lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB")
    print(f"\n{card}, {args.model} at {size} px, {str(dtype)[6:]}, rank {args.rank}, batch 1; median of {args.steps} "
          f"steps after a warm-up\n")
    what = "peak allocated over the model" if device.type == "cuda" else "peak RSS over the model"
    print(f"| | layers | s/step | steps/s | {what} |\n|---|---|---|---|---|")
    rows = [("diffusers + PEFT (attention only, UNet)", n_p, sec_p, peak_p),
            ("lorakit, same layers", n_l, sec_l, peak_l),
            ("lorakit default (all transformer layers, UNet + text encoder)", n_d, sec_d, peak_d)]
    for name, n, sec, peak in rows:
        print(f"| {name} | {n} | {sec:.3f} | {1 / sec:.2f} | {mib(peak)} |")
    total = time.perf_counter() - t0
    memory = f"; memory {peak_l / peak_p:.2f}× (target ≤ 1)" if peak_l is not None and peak_p else ""
    order = "PEFT measured first" if args.peft_first else "lorakit measured first"
    print(f"\n**lorakit / PEFT time per step: {sec_l / sec_p:.2f}×** (target ≤ 1.1×){memory}; {order}; "
          f"total {total:.0f} s; torch {torch.__version__}")


if __name__ == "__main__":
    main()
