"""The stages of ``train_demo_model.py``: the VAE, the text encoder's attribute pre-training, the denoiser.

Every random number comes from the ``numpy``/``torch`` generators passed in, so a run is the same bit for bit.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lorakit.demo.captions import PHRASINGS, caption, names_background
from lorakit.demo.shapes import BACKGROUNDS, COLOURS, COUNT_WORDS, POSITIONS, SHAPES, SIZES, Scene, random_scene, \
    render
from lorakit.generate.conditioning import chunk_prompt, padded_ids
from lorakit.generate.samplers import scheduler_for
from lorakit.generate.tokenizer import clip_tokenizer
from lorakit.train import diffusion

DEVICE = torch.device("cpu")
Log = Callable[[str], None]


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_tensor(images: list[Any]) -> Tensor:
    """PIL RGB images → (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(DEVICE)


# --- the VAE ---------------------------------------------------------------------------------------------------

def any_colour_picture(rng: np.random.Generator) -> Any:
    """A scene's layout in two random RGB colours at least 40 apart (the VAE must draw any flat colour)."""
    scene = random_scene(rng, pair_share=0.15, keep_held_out=True)
    while True:
        fg, bg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        if np.linalg.norm(np.subtract(fg, bg)) >= 40:
            return render(scene, colour=fg, background=bg)  # type: ignore[arg-type]


def vae_batch(rng: np.random.Generator, n: int, any_colour: float) -> Tensor:
    pictures = [any_colour_picture(rng) if rng.random() < any_colour else render(random_scene(rng, 0.15, True))
                for _ in range(n)]
    return to_tensor(pictures)


def crops(x: Tensor, size: int, rng: np.random.Generator) -> Tensor:
    """One random ``size``-px crop of each picture, at offsets that are multiples of 4 (the VAE's pooling)."""
    if size >= x.shape[-1]:
        return x
    offsets = rng.integers(0, (x.shape[-1] - size) // 4 + 1, size=(x.shape[0], 2)) * 4
    return torch.stack([img[:, y:y + size, x_:x_ + size] for img, (y, x_) in zip(x, offsets)])


def anchor_loss(mean: Tensor, x: Tensor) -> Tensor:
    """Keep the latents a picture: channels 0-2 ≈ the RGB picture pooled to the latents' size (4× for the shipped
    VAE, 2× for the candidate's), the other channels small. Colour is then the latents' largest, simplest signal,
    which the denoiser learns first."""
    pooled = nn.functional.avg_pool2d(x, x.shape[-1] // mean.shape[-1])
    return (mean[:, :3] - pooled).pow(2).mean() + 0.1 * mean[:, 3:].pow(2).mean()


def colour_loss(rec: Tensor, x: Tensor) -> Tensor:
    """The picture's colours as 4×4 means (the 4×-down-sampling VAE's latent cells, kept for the 2× one): flat
    colours must come back exactly."""
    return (nn.functional.avg_pool2d(rec, 4) - nn.functional.avg_pool2d(x, 4)).pow(2).mean()


def edge_loss(rec: Tensor, x: Tensor) -> Tensor:
    """The pictures' horizontal and vertical differences (L1): a shape's outline and points, which the L2 and colour
    losses (dominated by flat regions) let blur."""
    return ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())


def train_vae(vae: Any, r: Any, rng: np.random.Generator, gen: torch.Generator, log: Log) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(r.vae_steps):
        for group in opt.param_groups:
            group["lr"] = r.vae_lr * lr_at(step, r.vae_steps, 50, 0.05)
        x = crops(vae_batch(rng, r.vae_batch, r.vae_any_colour), r.vae_crop, rng)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(DEVICE)
        rec = vae.decode(z).sample
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + r.vae_kl * post.kl().mean()
        loss = loss + r.vae_anchor * anchor_loss(post.mean, x) + r.vae_colour * colour_loss(rec, x)
        if getattr(r, "vae_edge", 0.0):
            loss = loss + r.vae_edge * edge_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == r.vae_steps - 1:
            log(f"vae step {step}/{r.vae_steps} loss {loss.item():.5f}")
    vae.eval()


@torch.no_grad()
def encode_scenes(vae: Any, scenes: list[Scene]) -> Tensor:
    """The scenes' latent means (unscaled)."""
    return torch.cat([vae.encode(to_tensor([render(s) for s in scenes[i:i + 64]])).latent_dist.mean
                      for i in range(0, len(scenes), 64)])


# --- captions and the text encoder -----------------------------------------------------------------------------

class Captions:
    """Captions → 77-token ids exactly as lorakit's conditioning builds them (cached)."""

    def __init__(self) -> None:
        self.tokenizer = clip_tokenizer()
        self.cache: dict[str, Tensor] = {}

    def ids(self, texts: list[str]) -> Tensor:
        for text in texts:
            if text not in self.cache:
                chunks = chunk_prompt(text, self.tokenizer)
                if len(chunks) != 1:
                    raise ValueError(f"caption longer than one chunk: {text!r}")
                self.cache[text] = padded_ids(chunks[0], self.tokenizer)[0]
        return torch.stack([self.cache[t] for t in texts]).to(DEVICE)


# What the text encoder's end-of-text states must tell apart ("unsaid": a caption that does not name it).
ATTRIBUTE_VALUES: dict[str, list[str]] = {
    "colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNT_WORDS.values()), "size": list(SIZES),
    "position": list(POSITIONS), "background": [*BACKGROUNDS, "unsaid"]}


def attribute_targets(scene: Scene, phrasing: str) -> list[int]:
    words = dict(scene.attributes())
    if not names_background(phrasing):
        words["background"] = "unsaid"
    return [ATTRIBUTE_VALUES[a].index(words[a]) for a in ATTRIBUTE_VALUES]


class AttributeHeads(nn.Module):
    """One linear read-out per attribute from every state from the end-of-text token on (pre-training only)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, len(v)) for v in ATTRIBUTE_VALUES.values())

    def loss(self, states: Tensor, ids: Tensor, targets: Tensor, eos: int) -> Tensor:
        """Mean cross-entropy over attributes and the end-of-text positions; ``targets`` (B, attributes)."""
        after = (ids == eos).cumsum(1) > 0  # (B, 77): the end-of-text token and the padding after it
        picked = states[after]  # (N, width)
        rows = after.nonzero()[:, 0]
        return torch.stack([nn.functional.cross_entropy(head(picked), targets[rows, i])
                            for i, head in enumerate(self.heads)]).mean()


def caption_batch(rng: np.random.Generator, n: int, phrasings: int, pair_share: float
                  ) -> tuple[list[Scene], list[str], Tensor]:
    scenes = [random_scene(rng, pair_share) for _ in range(n)]
    chosen = [PHRASINGS[int(rng.integers(phrasings))] for _ in scenes]
    texts = [caption(s, p) for s, p in zip(scenes, chosen)]
    return scenes, texts, torch.tensor([attribute_targets(s, p) for s, p in zip(scenes, chosen)])


def pretrain_text_encoder(te: Any, r: Any, rng: np.random.Generator, captions: Captions, log: Log) -> None:
    """The text encoder learns to name every attribute of a caption from its end-of-text states, whatever the
    phrasing, before the denoiser reads them."""
    heads = AttributeHeads(te.config.hidden_size).to(DEVICE)
    params = list(te.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=r.te_pre_lr, weight_decay=0.01)
    te.train()
    for step in range(r.te_pre_steps):
        for group in opt.param_groups:
            group["lr"] = r.te_pre_lr * lr_at(step, r.te_pre_steps, 50, 0.05)
        _, texts, targets = caption_batch(rng, r.te_pre_batch, len(PHRASINGS), r.pair_share)
        ids = captions.ids(texts)
        loss = heads.loss(te(ids).last_hidden_state, ids, targets.to(DEVICE), te.config.eos_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == r.te_pre_steps - 1:
            log(f"text encoder step {step}/{r.te_pre_steps} loss {loss.item():.4f}")
    te.eval()


# --- the denoiser ----------------------------------------------------------------------------------------------

class Ema:
    def __init__(self, modules: list[nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
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


def timesteps(schedule: diffusion.NoiseSchedule, n: int, gen: torch.Generator, logit_normal: tuple[float, float] | None
              ) -> Tensor:
    """``n`` training timesteps: uniform, or ``t/T = sigmoid(m + s·z)`` (logit-normal, as SD3 trains: most samples at
    the middle noise levels where layout and shape form, few at the ends)."""
    if logit_normal is None:
        return diffusion.sample_timesteps(n, schedule, gen, DEVICE)
    m, s = logit_normal
    u = torch.sigmoid(m + s * torch.randn(n, generator=gen))
    return (u * schedule.steps).long().clamp(0, schedule.steps - 1).to(DEVICE)


def noised(schedule: diffusion.NoiseSchedule, x0: Tensor, gen: torch.Generator, offset: float,
           pure_share: float, logit_normal: tuple[float, float] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, ε: the noise that makes x_t from x₀, for the ε or v target). A ``pure_share`` of the samples is
    drawn at the last timestep from pure noise —
    x_t = ε exactly, as a sampler's first step sees it — with the target that makes x₀ what the caption says:
    SD's schedule keeps √ᾱ_T ≈ 0.07 of the picture at t = T, from which a model learns to read the layout and
    background off the noise instead of the caption."""
    noise = diffusion.sample_noise(x0, gen, offset)
    t = timesteps(schedule, x0.shape[0], gen, logit_normal)
    pure = torch.rand(x0.shape[0], generator=gen) < pure_share
    t = torch.where(pure.to(t.device), torch.full_like(t, schedule.steps - 1), t)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    a = schedule.alphas_cumprod[-1]
    terminal = (eps - a.sqrt() * x0) / (1 - a).sqrt()  # the ε for which x_T = eps
    noise = torch.where(pure.view(-1, 1, 1, 1).to(x0.device), terminal, noise)
    return diffusion.add_noise(schedule, x0, noise, t), t, noise


@dataclass
class Denoising:
    modules: dict[str, nn.Module]
    latents: Tensor  # scaled
    scenes: list[Scene]
    captions: Captions


def train_denoiser(d: Denoising, r: Any, rng: np.random.Generator, gen: torch.Generator,
                   save: Callable[[int], None], save_every: int, log: Log) -> None:
    unet, te = d.modules["unet"], d.modules["text_encoder"]
    schedule = diffusion.NoiseSchedule.from_scheduler(scheduler_for("Euler a", r.prediction))
    trainable = list(unet.parameters())
    groups: list[dict[str, Any]] = [{"params": list(unet.parameters()), "scale": 1.0}]
    te.requires_grad_(r.te_lr_scale > 0)
    if r.te_lr_scale > 0:
        trainable += list(te.parameters())
        groups.append({"params": list(te.parameters()), "scale": r.te_lr_scale})
    opt = torch.optim.AdamW(groups, lr=r.lr, weight_decay=r.weight_decay)
    ema = Ema([unet, te], r.ema_decay)
    unet.train()
    te.train(r.te_lr_scale > 0)
    start, marked = time.time(), 0
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = r.lr * group["scale"] * lr_at(step, r.steps, r.warmup, r.min_lr_ratio)
        idx = rng.integers(len(d.scenes), size=r.batch)
        texts = ["" if rng.random() < r.drop_caption else caption(d.scenes[i], int(rng.integers(len(PHRASINGS))))
                 for i in idx]
        ids = d.captions.ids(texts)
        with torch.set_grad_enabled(r.te_lr_scale > 0):
            context = te(ids).last_hidden_state
        x0 = d.latents[torch.from_numpy(idx).to(DEVICE)]
        logit_normal = (r.t_mean, r.t_std) if r.t_std > 0 else None
        x_t, t, noise = noised(schedule, x0, gen, r.noise_offset, r.pure_noise_share, logit_normal)
        pred = unet(x_t, t, context).sample
        loss = diffusion.diffusion_loss(pred, diffusion.target(schedule, x0, noise, t),
                                        diffusion.loss_weights(schedule, t, r.min_snr_gamma))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, r.grad_clip)
        opt.step()
        ema.update()
        if step % 50 == 0 or step == r.steps - 1:
            rate = (step + 1 - marked) / max(time.time() - start, 1e-9)
            log(f"unet step {step}/{r.steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{1 / rate:.2f}s/step")
            start, marked = time.time(), step + 1
        if (step + 1) % save_every == 0 or step == r.steps - 1:
            ema.swap()
            save(step + 1)
            ema.swap()
    unet.eval()
    te.eval()
