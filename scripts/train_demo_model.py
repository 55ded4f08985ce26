#!/usr/bin/env python
"""Train lorakit's demo model — a tiny SD1-architecture pipeline that draws coloured shapes from text — and write
its weights into the package (``src/lorakit/data/demo/``: ``demo.safetensors`` fp16 + ``demo.json``).

Deterministic: fixed seeds, 2 CPU threads, torch's deterministic algorithms; a given torch version on a given CPU
gives the same files. Stages: (1) the VAE (4× down, 16×16×4 latents; channels 0-2 held to the 4×-pooled picture,
so colour is the latents' plainest signal) on crops of rendered shapes; (2) a fixed set of scenes encoded to
latents; (3) UNet + text encoder jointly (AdamW, warm-up + cosine, min-SNR-5, EMA, 10% empty captions for
classifier-free guidance) with lorakit's diffusion objective (``lorakit.train.diffusion``); (4) a warm restart: a
second, shorter cosine cycle from the written (fp16, EMA) checkpoint on new scenes. The EMA weights are written
every ``--save-every`` steps (so a usable model exists early), each file to a temporary name and renamed.

    python scripts/train_demo_model.py            # stages 1-5, the shipped model (demo.json "seconds": each one's time)
    python scripts/train_demo_model.py --quick    # a smoke run into /tmp/lorakit-demo-quick
    python scripts/train_demo_model.py --init DIR # only stages 4-5, from a checkpoint stages 1-3 wrote to DIR

Stage 5 is a short low-rate colour cycle (150 steps at 3e-4 on 2,000 new scenes, with all 12 phrasings — four
that move the colour word; 0.81 → 0.92 colour on the test's 48 images, ~2 minutes). Set ``--set colour_steps=0``
(or ``restart2_steps=0``, ``restart_steps=0``) to stop earlier.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall on a busy machine
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorakit.demo import weights as demo_weights
from lorakit.demo.captions import PHRASINGS, caption
from lorakit.demo.shapes import random_scene, render
from lorakit.generate.conditioning import chunk_prompt, padded_ids
from lorakit.generate.samplers import scheduler_for
from lorakit.generate.tokenizer import clip_tokenizer
from lorakit.train import diffusion

VERSION = 1


@dataclass(frozen=True)
class Recipe:
    seed: int = 20261126
    vae_steps: int = 800
    vae_batch: int = 24
    vae_crop: int = 32  # the VAE trains on 4-aligned crops of the 64-px pictures (4× cheaper)
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    vae_anchor: float = 1.0  # latent channels 0-2 held to the 4×-pooled RGB picture, channel 3 near 0
    scenes: int = 8000
    # How many of ``shapes.PHRASINGS`` the captions use: 8, the shipped model's; 12 adds the four that move the
    # colour word (first, after the shape, after the background), for colour in unseen phrasings.
    phrasings: int = 8
    steps: int = 1400
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.05
    drop_caption: float = 0.1
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    # A second cosine cycle (warm restart) from the written checkpoint (fp16 EMA weights, VAE frozen), on a new
    # set of scenes: ``--init FOLDER`` runs only this part, from a checkpoint written by the first.
    restart_steps: int = 500
    restart_lr: float = 5e-4
    restart_warmup: int = 50
    # A third cycle, the same way from the second's output (shape accuracy 0.40 → 0.94, colour 0.85 → 0.81).
    restart2_steps: int = 1200
    restart2_lr: float = 8e-4
    restart2_warmup: int = 50
    # A fourth, short low-rate cycle on its own scenes with all 12 phrasings, for colour (0.81 → 0.92).
    colour_steps: int = 150
    colour_lr: float = 3e-4
    colour_warmup: int = 10
    colour_scenes: int = 2000
    colour_phrasings: int = 12


QUICK = {"vae_steps": 60, "scenes": 512, "steps": 60, "warmup": 10, "restart_steps": 20, "restart_warmup": 5,
         "restart2_steps": 10, "restart2_warmup": 2, "colour_steps": 10, "colour_warmup": 2, "colour_scenes": 256}
SAVE_EVERY = 200


def log(msg: str, start: float) -> None:
    print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


DEVICE = torch.device("cpu")


def to_tensor(images: list[Any]) -> torch.Tensor:
    """PIL RGB images → (B, 3, H, W) in [-1, 1], on ``DEVICE``."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(DEVICE)


def crops(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random ``size``-px crop of each picture, at offsets that are multiples of 4 (the VAE's pooling)."""
    if size >= x.shape[-1]:
        return x
    offsets = rng.integers(0, (x.shape[-1] - size) // 4 + 1, size=(x.shape[0], 2)) * 4
    return torch.stack([img[:, y:y + size, x_:x_ + size] for img, (y, x_) in zip(x, offsets)])


def anchor_loss(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep the latents a picture: channels 0-2 ≈ the RGB picture pooled 4×, channel 3 small. Colour is then
    the latents' largest, simplest signal, which the denoiser learns first."""
    pooled = torch.nn.functional.avg_pool2d(x, 4)
    return (mean[:, :3] - pooled).pow(2).mean() + 0.1 * mean[:, 3].pow(2).mean()


def train_vae(vae: Any, r: Recipe, rng: np.random.Generator, gen: torch.Generator,
              start: float) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(r.vae_steps):
        for group in opt.param_groups:
            group["lr"] = r.vae_lr * lr_at(step, r.vae_steps, 50, 0.05)
        x = crops(to_tensor([render(random_scene(rng)) for _ in range(r.vae_batch)]), r.vae_crop, rng)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(DEVICE)
        rec = vae.decode(z).sample
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + r.vae_kl * post.kl().mean()
        loss = loss + r.vae_anchor * anchor_loss(post.mean, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == r.vae_steps - 1:
            log(f"vae step {step}/{r.vae_steps} loss {loss.item():.5f}", start)
    vae.eval()


@torch.no_grad()
def encode_dataset(vae: Any, r: Recipe, rng: np.random.Generator) -> tuple[torch.Tensor, list[Any]]:
    """A fixed set of scenes and their latent means (unscaled)."""
    scenes = [random_scene(rng) for _ in range(r.scenes)]
    latents = []
    for i in range(0, len(scenes), 64):
        latents.append(vae.encode(to_tensor([render(s) for s in scenes[i:i + 64]])).latent_dist.mean)
    return torch.cat(latents), scenes


class Captions:
    """Captions → 77-token ids exactly as lorakit's conditioning builds them (cached)."""

    def __init__(self) -> None:
        self.tokenizer = clip_tokenizer()
        self.cache: dict[str, torch.Tensor] = {}

    def ids(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            chunks = chunk_prompt(text, self.tokenizer)
            if len(chunks) != 1:
                raise ValueError(f"caption longer than one chunk: {text!r}")
            self.cache[text] = padded_ids(chunks[0], self.tokenizer)[0]
        return self.cache[text]


class Ema:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live and the averaged weights (call twice to undo)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def train_denoiser(modules: dict[str, torch.nn.Module], latents: torch.Tensor, scenes: list[Any], r: Recipe,
                   rng: np.random.Generator, gen: torch.Generator, save: Any, save_every: int,
                   start: float) -> None:
    unet, te = modules["unet"], modules["text_encoder"]
    schedule = diffusion.NoiseSchedule.from_scheduler(scheduler_for("Euler a"))
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    ema = Ema([unet, te], r.ema_decay)
    captions = Captions()
    unet.train()
    te.train()
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = r.lr * lr_at(step, r.steps, r.warmup, r.min_lr_ratio)
        idx = rng.integers(len(scenes), size=r.batch)
        texts = ["" if rng.random() < r.drop_caption else caption(scenes[i], int(rng.integers(r.phrasings)))
                 for i in idx]
        ids = torch.stack([captions.ids(t) for t in texts]).to(DEVICE)
        x0 = latents[torch.from_numpy(idx).to(DEVICE)]
        noise = diffusion.sample_noise(x0, gen, r.noise_offset)
        t = diffusion.sample_timesteps(r.batch, schedule, gen, x0.device)
        noisy = diffusion.add_noise(schedule, x0, noise, t)
        pred = unet(noisy, t, te(ids).last_hidden_state).sample
        loss = diffusion.diffusion_loss(pred, diffusion.target(schedule, x0, noise, t),
                                        diffusion.loss_weights(schedule, t, r.min_snr_gamma))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        opt.step()
        ema.update()
        if step % 50 == 0 or step == r.steps - 1:
            log(f"unet step {step}/{r.steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}", start)
        if (step + 1) % save_every == 0 or step == r.steps - 1:
            ema.swap()
            save(step + 1)
            ema.swap()
    unet.eval()
    te.eval()


def write(out: Path, modules: dict[str, torch.nn.Module], scaling: float, r: Recipe, step: int,
          times: dict[str, float]) -> None:
    """``demo.safetensors`` (fp16) and ``demo.json``, each written to a temporary name and renamed."""
    from lorakit.files.io import save_file  # byte-for-byte reproducible (safetensors' own shuffles metadata)

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().to(torch.float16).contiguous()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    meta = {"version": VERSION, "configs": demo_weights.CONFIGS, "vae_scaling_factor": scaling,
            "recipe": asdict(r), "unet_steps_done": step, "seconds": times, "torch": torch.__version__,
            "trained_by": "scripts/train_demo_model.py"}
    tmp = out / ".demo.safetensors.tmp"
    save_file(tensors, tmp, metadata={"format": "pt", "lorakit_demo_version": str(VERSION)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / demo_weights.WEIGHTS.name)
    tmp = out / ".demo.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / demo_weights.META.name)


def judge(folder: Path, start: float) -> None:
    """Generate the evaluation set from the model just written and log its scores."""
    from lorakit.demo import evalset
    from lorakit.demo.evaluate import evaluate
    from lorakit.models.loading import demo_model, place_model

    model = place_model(demo_model(folder), DEVICE, torch.float32)
    for line in evaluate(model, evalset.ci_slice(evalset.load())).table().splitlines():
        log(f"eval {line}", start)


def stage_one(r: Recipe, out: Path, save_every: int, evaluate: bool, start: float) -> float:
    """VAE, dataset, first UNet + text encoder cycle; returns the VAE's scaling factor."""
    torch.manual_seed(r.seed)
    rng, gen = np.random.default_rng(r.seed), torch.Generator().manual_seed(r.seed)
    times: dict[str, float] = {}
    modules = {name: m.to(DEVICE) for name, m in demo_weights.build().items()}
    train_vae(modules["vae"], r, rng, gen, start)
    times["vae"] = round(time.time() - start, 1)
    latents, scenes = encode_dataset(modules["vae"], r, rng)
    scaling = float(1 / latents.std())
    times["encode"] = round(time.time() - start - times["vae"], 1)
    log(f"{len(scenes)} scenes encoded; latent std {latents.std():.4f} mean {latents.mean():.4f}", start)
    mark = time.time()

    def save(step: int) -> None:
        times["unet"] = round(time.time() - mark, 1)
        write(out, modules, scaling, r, step, dict(times))
        log(f"saved step {step} to {out}", start)
        if evaluate:
            judge(out, start)

    train_denoiser(modules, latents * scaling, scenes, r, rng, gen, save, save_every, start)
    return scaling


def stage_two(r: Recipe, init: Path, out: Path, save_every: int, evaluate: bool, start: float,
              cycle: Recipe, name: str) -> None:
    """A warm restart: weights from ``init`` (as written: fp16), ``cycle.scenes`` new scenes, another cosine
    cycle of ``cycle.steps`` steps (its lr, warm-up and phrasings). ``r`` (the whole recipe) goes into demo.json;
    ``name`` keys this cycle's times there."""
    torch.manual_seed(r.seed + 1)
    rng, gen = np.random.default_rng(r.seed + 1), torch.Generator().manual_seed(r.seed + 1)
    meta = demo_weights.read_meta(init)
    scaling, done = float(meta["vae_scaling_factor"]), int(meta["unet_steps_done"])
    times = dict(meta.get("seconds", {}))
    modules = {name: m.to(DEVICE) for name, m in demo_weights.load_components(init).items()}
    mark = time.time()
    latents, scenes = encode_dataset(modules["vae"], cycle, rng)
    times[f"encode_{name}"] = round(time.time() - mark, 1)
    log(f"{name} from {init} (step {done}): {len(scenes)} new scenes encoded", start)
    mark = time.time()

    def save(step: int) -> None:
        times[f"unet_{name}"] = round(time.time() - mark, 1)
        write(out, modules, scaling, r, done + step, dict(times))
        log(f"saved step {done + step} to {out}", start)
        if evaluate:
            judge(out, start)

    train_denoiser(modules, latents * scaling, scenes, cycle, rng, gen, save, save_every, start)


def cycles(r: Recipe) -> list[tuple[str, Recipe]]:
    """Stages 3-5 (the warm restarts), each as the recipe its cycle trains with; a cycle of 0 steps is left out."""
    runs = [("restart", replace(r, steps=r.restart_steps, lr=r.restart_lr, warmup=r.restart_warmup)),
            ("restart2", replace(r, steps=r.restart2_steps, lr=r.restart2_lr, warmup=r.restart2_warmup)),
            ("colour", replace(r, steps=r.colour_steps, lr=r.colour_lr, warmup=r.colour_warmup,
                               scenes=r.colour_scenes, phrasings=r.colour_phrasings))]
    return [(name, cycle) for name, cycle in runs if cycle.steps > 0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the package's data/demo)")
    p.add_argument("--init", type=Path, default=None, help="run only the warm restart, from this checkpoint")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (into /tmp/lorakit-demo-quick)")
    p.add_argument("--save-every", type=int, default=SAVE_EVERY)
    p.add_argument("--device", default="cpu", help="where to train (cpu: the reproducible, shipped run)")
    p.add_argument("--eval", action="store_true", help="judge the model at each save (lorakit.demo.evaluate)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a recipe value")
    a = p.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if a.quick else {}
    for item in a.set:
        key, value = item.split("=", 1)
        overrides[key] = type(getattr(Recipe(), key))(value)
    r = Recipe(**overrides)
    for key in ("phrasings", "colour_phrasings"):
        if not 1 <= getattr(r, key) <= len(PHRASINGS):
            p.error(f"{key} must be 1..{len(PHRASINGS)}, got {getattr(r, key)}")
    out = a.out or (Path("/tmp/lorakit-demo-quick") if a.quick else demo_weights.DATA_DIR)
    global DEVICE
    DEVICE = torch.device(a.device)
    torch.set_flush_denormal(True)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.time()
    log(f"recipe {asdict(r)} -> {out}", start)
    if a.init is None:
        stage_one(r, out, a.save_every, a.eval, start)
    for i, (name, cycle) in enumerate(cycles(r)):
        stage_two(r, a.init if a.init is not None and i == 0 else out, out, a.save_every, a.eval, start, cycle,
                  name)
    log(f"done in {time.time() - start:.0f}s", start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
