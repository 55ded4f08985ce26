"""What one training step of demo-model UNet layouts costs on this machine (batch 32, forward + backward + AdamW,
fp32, 2 threads): the shipped UNet on its 16×16 latents, the same UNet on a 2× VAE's 32×32 latents, and two
three-level layouts for 32×32 (a 32-wide level in front; cross-attention at 8×8 only, or at 16×16 too).

    python benchmarks/demo_unet_cost.py            # every layout, side by side
    python benchmarks/demo_unet_cost.py shipped16 front32
    python benchmarks/demo_unet_cost.py front32 --channels-last --compile   # eager, channels-last, torch.compile
"""
from __future__ import annotations

import argparse
import time

import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorakit.demo.weights import CONFIGS  # noqa: E402

SHIPPED: dict[str, Any] = {k: v for k, v in CONFIGS["unet"].items() if k != "sample_size"}  # the shipped UNet


def _front(attn16: bool) -> dict[str, Any]:
    """The shipped levels one level lower, behind a 32-wide level without attention (the candidate's
    ``unet_front=32``; ``attn16``: its 16×16 level cross-attends too, ``unet_attn16=1``)."""
    middle = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attn16 else ("DownBlock2D", "UpBlock2D")
    down, up = SHIPPED["down_block_types"], SHIPPED["up_block_types"]
    return {**SHIPPED, "block_out_channels": [32, *SHIPPED["block_out_channels"]],
            "down_block_types": ["DownBlock2D", middle[0], *down[1:]],
            "up_block_types": [*up[:-1], middle[1], "UpBlock2D"]}


LAYOUTS = {
    "shipped16": (16, SHIPPED),
    "shipped32": (32, SHIPPED),
    "front32": (32, _front(attn16=False)),
    "front32_attn16": (32, _front(attn16=True)),
}


def step_seconds(size: int, layout: dict[str, Any], steps: int = 4, mode: str = "eager"
                 ) -> tuple[float, list[float]]:
    """Parameters (M) and the seconds of each step after a first (warm-up; compilation for ``compile``)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size, **layout)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    x, ctx = torch.randn(32, 4, size, size), torch.randn(32, 77, layout["cross_attention_dim"])
    t = torch.randint(0, 1000, (32,))
    if mode == "channels_last":
        unet = unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(unet) if mode == "compile" else unet
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = forward(x, t, ctx).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sum(p.numel() for p in unet.parameters()) / 1e6, times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("layouts", nargs="*", default=list(LAYOUTS), help=f"some of: {', '.join(LAYOUTS)} (default: all)")
    p.add_argument("--channels-last", action="store_true", help="also time channels-last memory format")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (first step: compilation)")
    a = p.parse_args(argv)
    if unknown := [n for n in a.layouts if n not in LAYOUTS]:
        p.error(f"unknown layout {unknown[0]!r}; known: {', '.join(LAYOUTS)}")
    modes = ["eager"] + ["channels_last"] * a.channels_last + ["compile"] * a.compile
    torch.set_num_threads(2)
    for name in a.layouts:
        size, layout = LAYOUTS[name]
        for mode in modes:
            params, times = step_seconds(size, layout, mode=mode)
            steps = " ".join(f"{t:.2f}" for t in times[1:])
            print(f"{name:15s} {mode:13s} {size}x{size} latents  {params:.2f} M parameters  "
                  f"first step {times[0]:.2f} s, then s/step {steps}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
