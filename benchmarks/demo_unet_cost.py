"""What one training step of demo-model UNet layouts costs on this machine (batch 32, forward + backward + AdamW,
fp32, 2 threads): the shipped UNet on its 16×16 latents, the same UNet on a 2× VAE's 32×32 latents, and two
three-level layouts for 32×32 (a 32-wide level in front; cross-attention at 8×8 only, or at 16×16 too).

    python benchmarks/demo_unet_cost.py            # every layout, side by side
    python benchmarks/demo_unet_cost.py shipped16 front32
"""
from __future__ import annotations

import sys
import time

import torch
from diffusers import UNet2DConditionModel

COMMON = {"layers_per_block": 1, "norm_num_groups": 32, "cross_attention_dim": 64, "attention_head_dim": 8}
TWO = {"block_out_channels": [64, 128], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
       "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
LAYOUTS = {
    "shipped16": (16, TWO),
    "shipped32": (32, TWO),
    "front32": (32, {"block_out_channels": [32, 64, 128],
                     "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                     "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}),
    "front32_attn16": (32, {"block_out_channels": [32, 64, 128],
                            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}),
}


def step_seconds(size: int, layout: dict[str, object], steps: int = 4) -> tuple[float, list[float]]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size, **COMMON, **layout)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    x, ctx = torch.randn(32, 4, size, size), torch.randn(32, 77, 64)
    t = torch.randint(0, 1000, (32,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = unet(x, t, ctx).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sum(p.numel() for p in unet.parameters()) / 1e6, times


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    for name in argv or list(LAYOUTS):
        size, layout = LAYOUTS[name]
        params, times = step_seconds(size, layout)
        steps = " ".join(f"{t:.2f}" for t in times)
        print(f"{name:15s} {size}x{size} latents  {params:.2f} M parameters  s/step {steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
