"""The diffusion training objective, shared by ``lorakit train`` and ``scripts/train_demo_model.py``.

One step: clean latents x₀, noise ε (+ an optional per-channel noise offset, as kohya's ``--noise_offset``), a
timestep t per sample, ``x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε``; the model predicts ε (``epsilon`` models) or
``v = √ᾱ_t·ε - √(1-ᾱ_t)·x₀`` (``v_prediction`` models, SD2-768); the loss is the per-sample MSE, weighted by
min-SNR-γ (Hang et al. 2023: ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR+1)`` for v) when γ is given.

Random numbers come from a CPU ``torch.Generator`` and are moved to the latents' device, so a seed gives the same
run on every device (and bitwise the same on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTIONS = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t of a DDPM schedule (what the model was trained with) and the prediction type."""
    alphas_cumprod: Tensor  # (T,) fp32, on the CPU
    prediction: str = "epsilon"

    @classmethod
    def from_scheduler(cls, scheduler: object) -> NoiseSchedule:
        """From any diffusers scheduler config (SD's ``scaled_linear`` β 0.00085…0.012, 1000 steps by default)."""
        from diffusers import DDPMScheduler

        cfg = dict(getattr(scheduler, "config", {}) or {})
        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        ddpm = DDPMScheduler(**{k: cfg[k] for k in keep if k in cfg})
        prediction = str(ddpm.config.prediction_type)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction type {prediction!r}: expected one of {', '.join(PREDICTIONS)}")
        return cls(ddpm.alphas_cumprod.to(torch.float32), prediction)

    @property
    def steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def snr(self, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t.cpu()]
        return (a / (1 - a)).to(t.device)


def sample_noise(latents: Tensor, generator: torch.Generator, offset: float = 0.0) -> Tensor:
    """ε like ``latents`` (drawn on the CPU generator), plus ``offset``·(one value per sample and channel)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset:
        noise += offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=torch.float32)
    return noise.to(latents.device, latents.dtype)


def sample_timesteps(n: int, schedule: NoiseSchedule, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, schedule.steps, (n,), generator=generator).to(device)


def _coef(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    a = schedule.alphas_cumprod[t.cpu()].to(like.device, torch.float32)
    shape = (-1,) + (1,) * (like.dim() - 1)
    return a.sqrt().view(shape), (1 - a).sqrt().view(shape)


def add_noise(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    sa, sb = _coef(schedule, t, x0)
    return (sa * x0.float() + sb * noise.float()).to(x0.dtype)


def target(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the model should predict: ε, or v."""
    if schedule.prediction == "epsilon":
        return noise
    sa, sb = _coef(schedule, t, x0)
    return (sa * noise.float() - sb * x0.float()).to(x0.dtype)


def loss_weights(schedule: NoiseSchedule, t: Tensor, min_snr_gamma: float | None) -> Tensor | None:
    """Per-sample min-SNR-γ weights, or ``None`` (plain MSE)."""
    if not min_snr_gamma:
        return None
    snr = schedule.snr(t).float()
    clipped = torch.clamp(snr, max=min_snr_gamma)
    return clipped / (snr + 1) if schedule.prediction == "v_prediction" else clipped / snr


def diffusion_loss(pred: Tensor, want: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over samples of (weighted) per-sample MSE, computed in fp32."""
    per_sample = (pred.float() - want.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
