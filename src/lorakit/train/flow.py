"""The rectified-flow (flow-matching) training objective, for the models sampled by ``FlowMatchEulerDiscreteScheduler``
(FLUX.1, SD3, Chroma, Qwen-Image; their step: ``flow_loop.FlowTrainer``) — the counterpart of ``diffusion.py``
(ε / v, DDPM ᾱ_t).

One step: clean latents x₀, noise ε ~ N(0, 1), a noise level σ ∈ (0, 1) per sample, ``x_σ = (1 - σ)·x₀ + σ·ε``;
the model predicts the velocity ``v = ε - x₀`` (kohya's ``--model_prediction_type raw``: the output as it is);
the loss is the plain per-sample MSE (no weighting: kohya's ``--weighting_scheme none``). The model is given σ
itself as its timestep (diffusers' ``FluxTransformer2DModel`` multiplies it by 1000, as BFL's ``timestep_embedding``
does; kohya passes ``timesteps / 1000`` = σ).

σ sampling (kohya sd-scripts ``library/flux_train_utils.py`` ``get_noisy_model_input_and_timesteps``; u ~ N(0, 1)):

- ``uniform``: σ ~ U(0, 1);
- ``sigmoid``: σ = sigmoid(s·u), s = ``sigmoid_scale`` (x-flux's and ai-toolkit's default: ai-toolkit
  ``toolkit/config_modules.py`` ``timestep_type='sigmoid'``);
- ``shift``: σ = sigmoid(s·u), then ``shift·σ / (1 + (shift - 1)·σ)`` (``--discrete_flow_shift``, default 3.0;
  kohya's docs recommend 3.1582);
- ``flux_shift``: σ = sigmoid(s·u), then FLUX.1's resolution-dependent shift ``e^μ / (e^μ + 1/σ - 1)`` with μ linear
  in the number of image tokens (0.5 at 256, 1.15 at 4096: the model's scheduler config where it says so) — what
  the dev scheduler does at inference (``use_dynamic_shifting``).

Random numbers come from a CPU generator, so a seed gives the same run on every device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import TrainingError

SAMPLINGS = ("sigmoid", "uniform", "shift", "flux_shift")
DEFAULT_SHIFT = 3.0  # kohya's --discrete_flow_shift default
DEFAULT_GUIDANCE = 1.0  # the embedded guidance while training (kohya's recommended 1.0, ai-toolkit's cfg_scale 1.0)
# FLUX.1-dev's scheduler config (base_image_seq_len, max_image_seq_len, base_shift, max_shift): μ for flux_shift
DYNAMIC_SHIFT = (256, 4096, 0.5, 1.15)


@dataclass(frozen=True)
class FlowSpec:
    """The flow-matching flags; ``None`` means "the default" (so a run on an ε/v model can tell none was given)."""

    timestep_sampling: str | None = None  # None: sigmoid
    sigmoid_scale: float | None = None  # None: 1.0
    shift: float | None = None  # None: 3.0 (``shift`` sampling only)
    guidance: float | None = None  # None: 1.0 on guidance-distilled models (FLUX.1-dev); refused on others
    max_sequence_length: int | None = None  # T5 tokens; None: the model's (FLUX.1-dev 512, schnell 256)

    @property
    def sampling(self) -> str:
        return self.timestep_sampling or "sigmoid"

    def given(self) -> list[str]:
        """The flags set (for the message that refuses them on a model without a flow objective)."""
        names = {"timestep_sampling": "--timestep-sampling", "sigmoid_scale": "--sigmoid-scale",
                 "shift": "--discrete-flow-shift", "guidance": "--guidance",
                 "max_sequence_length": "--max-sequence-length"}
        return [flag for key, flag in names.items() if getattr(self, key) is not None]

    def check(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise TrainingError(f"--timestep-sampling must be one of {', '.join(SAMPLINGS)}, got "
                                f"{self.timestep_sampling!r}")
        for flag, v in (("--sigmoid-scale", self.sigmoid_scale), ("--discrete-flow-shift", self.shift),
                        ("--guidance", self.guidance)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise TrainingError(f"{flag} must be a finite number ≥ 0, got {v}")
        if self.shift is not None and self.shift <= 0:
            raise TrainingError(f"--discrete-flow-shift must be > 0, got {self.shift}")
        if self.shift is not None and self.sampling != "shift":
            raise TrainingError("--discrete-flow-shift applies to --timestep-sampling shift only")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise TrainingError(f"--max-sequence-length must be 1…512, got {self.max_sequence_length}")


def sampling_metadata(spec: FlowSpec) -> dict[str, str]:
    """kohya's ``ss_*`` fields of the σ sampling and the objective (a flow-matching LoRA's metadata)."""
    shift = (DEFAULT_SHIFT if spec.shift is None else spec.shift) if spec.sampling == "shift" else None
    return {"ss_timestep_sampling": spec.sampling,
            "ss_sigmoid_scale": f"{1.0 if spec.sigmoid_scale is None else spec.sigmoid_scale:g}",
            "ss_discrete_flow_shift": "None" if shift is None else f"{shift:g}",
            "ss_model_prediction_type": "raw", "ss_weighting_scheme": "none"}


def dynamic_shift(scheduler: object) -> tuple[float, float, float, float]:
    """(base_image_seq_len, max_image_seq_len, base_shift, max_shift) of a flow scheduler's config (FLUX.1-dev's
    values where it does not say)."""
    cfg = dict(getattr(scheduler, "config", {}) or {})
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    return tuple(float(cfg.get(k) or d) for k, d in zip(keys, DYNAMIC_SHIFT))  # type: ignore[return-value]


def sample_sigmas(n: int, spec: FlowSpec, generator: torch.Generator, tokens: int,
                  dynamic: tuple[float, float, float, float] = DYNAMIC_SHIFT) -> Tensor:
    """n noise levels σ ∈ (0, 1), fp32 on the CPU; ``tokens``: the image tokens of the batch (``flux_shift``)."""
    if spec.sampling == "uniform":
        return torch.rand((n,), generator=generator, dtype=torch.float32)
    scale = 1.0 if spec.sigmoid_scale is None else spec.sigmoid_scale
    sigmas = torch.sigmoid(scale * torch.randn((n,), generator=generator, dtype=torch.float32))
    if spec.sampling == "shift":
        shift = DEFAULT_SHIFT if spec.shift is None else spec.shift
        return shift * sigmas / (1 + (shift - 1) * sigmas)
    if spec.sampling == "flux_shift":
        base_len, max_len, base_shift, max_shift = dynamic
        mu = base_shift + (max_shift - base_shift) * (tokens - base_len) / (max_len - base_len)
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return sigmas


def _view(sigmas: Tensor, like: Tensor) -> Tensor:
    return sigmas.to(like.device, torch.float32).view((-1,) + (1,) * (like.dim() - 1))


def add_noise(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_σ = (1 - σ)·x₀ + σ·ε (computed in fp32, returned in x₀'s dtype)."""
    s = _view(sigmas, x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity the model predicts: ε - x₀."""
    return (noise.float() - x0.float()).to(x0.dtype)
