"""The trainer of the flow-matching DiT families (FLUX.1, SD3, Chroma, Qwen-Image): the ``Trainer`` of ``loop.py``
with one step shared by all of them — cached latents x₀, noise ε, σ per sample (``flow.sample_sigmas``),
x_σ = (1-σ)·x₀ + σ·ε, the family's forward, the unweighted MSE against ε - x₀ in the layout the forward returns
(``packed``) — and the per-caption text cache. A family (``flux_loop``, ``sd3_loop``, ``chroma_loop``,
``qwen_loop``) supplies data and an adapter only: which models it trains (``trains``), its network, its prompt
encoding (``encode``: a ``Conditioning``), its forward (``predict``) and its metadata.

What no flow family takes is refused here: ``--min-snr-gamma`` and ``--noise-offset`` (an SNR weighting and an ε
trick of the DDPM objective; kohya's flow trainers have neither).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import TrainingError
from ..generate.conditioning import Conditioning
from ..generate.sampling import stack
from ..models.loading import BaseModel
from . import diffusion as dif
from . import flow
from .loop import Trainer
from .network import Network


class FlowTrainer(Trainer):
    """``display``: the family's name in messages; ``arches``: the architectures it trains; ``patch``: the
    latents' patch side the transformer packs (``tokens`` for ``flux_shift``)."""

    display = "flow-matching"
    arches: tuple[str, ...] = ()
    patch = 2

    @classmethod
    def trains(cls, model: BaseModel) -> bool:
        """Whether this trainer is the one of ``model``'s family (``flux_loop.trainer_for`` asks each)."""
        return model.arch in cls.arches

    # -- what the family decides ---------------------------------------------------------------------------------
    def check_family(self) -> None:
        """The family's own refusals (flags that do not apply to it)."""

    def network(self) -> Network:
        raise NotImplementedError

    def encode(self, captions: list[str]) -> Conditioning:
        """The prompt conditioning of ``captions`` as the family's pipeline makes it (b rows)."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's velocity for x_σ (b, c, h, w) at σ (b,), in the layout of ``packed``."""
        raise NotImplementedError

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) latents in the layout the transformer's output has (FLUX-style 2×2 patches: ``pack``)."""
        return pack(x)

    @property
    def text_live(self) -> bool:
        """Whether a text encoder trains (then captions are encoded every step, not cached)."""
        return self.train_te

    # -- shared ----------------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        cfg = self.cfg
        if not self.trains(self.model):
            raise TrainingError(f"the model {self.model.name} is not {self.display} ({self.model.arch})")
        refused = [flag for flag, v in (("--min-snr-gamma", cfg.min_snr_gamma), ("--noise-offset", cfg.noise_offset))
                   if v]
        if refused:
            raise TrainingError(f"{', '.join(refused)}: for ε/v-prediction models; {self.display} is trained on the "
                                "flow-matching velocity, unweighted (see --timestep-sampling)")
        self.check_family()

    def setup(self) -> Network:
        self.dynamic = flow.dynamic_shift(self.model.pipe.scheduler)
        self.cond_cache: dict[str, Conditioning] = {}
        return self.network()

    @property
    def denoiser(self) -> Any:
        return self.model.pipe.transformer

    def conditioning(self, captions: list[str]) -> Conditioning:
        """``encode`` of the batch; each caption encoded once (cached) while no text encoder trains. Cached
        conditionings of different lengths (an LLM encoder's) are padded with their mask (``sampling.stack``)."""
        if self.text_live:
            return self.encode(captions)
        with torch.no_grad():
            for c in captions:
                if c not in self.cond_cache:
                    self.cond_cache[c] = self.encode([c])
        return stack([self.cond_cache[c] for c in captions], [1] * len(captions))

    def loss(self, batch: list[int]) -> torch.Tensor:
        """The flow-matching loss of one micro-batch."""
        x0 = torch.stack([self.samples[i].latent for i in batch])
        n, _, h, w = x0.shape
        noise = dif.sample_noise(x0, self.gen)
        tokens = (h // self.patch) * (w // self.patch)
        sigmas = flow.sample_sigmas(n, self.cfg.flow, self.gen, tokens, self.dynamic)
        pred = self.predict(flow.add_noise(x0, noise, sigmas), sigmas, self.conditioning(self._captions(batch)))
        return dif.diffusion_loss(pred, self.packed(flow.target(x0, noise)))


def pack(x: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) → (b, h/2·w/2, 4·c): 2×2 patches, as FLUX.1's, Chroma's and Qwen-Image's pipelines pack
    (``FluxPipeline._pack_latents``; the others' are copies of it)."""
    from diffusers import FluxPipeline

    n, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, n, c, h, w)


def image_ids(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The position ids (h/2·w/2, 3) of the packed latents of x (b, c, h, w) (FLUX.1's and Chroma's)."""
    from diffusers import FluxPipeline

    _, _, h, w = x.shape
    return FluxPipeline._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, x.device, dtype)
