"""``lorakit train`` on FLUX.1 (dev, schnell): the ``Trainer`` of ``loop.py`` with the flow-matching objective
(``flow.py``), FLUX's conditioning and packed latents, and kohya's FLUX network (``flux_network.py``).

One micro-batch (kohya sd-scripts ``flux_train_network.py`` ``get_noise_pred_and_target``): cached latents x₀ (the
VAE's mean, shifted and scaled by the VAE's ``shift_factor``/``scaling_factor``), ε, σ per sample, x_σ; packed into
2×2 patches (``FluxPipeline._pack_latents``) with their position ids; T5 embeddings and CLIP-L's pooled output as
``FluxPipeline`` makes them (``_get_t5_prompt_embeds``/``_get_clip_prompt_embeds``: the same tokenizers, lengths and
dtypes as generation; each cached per caption unless its encoder is trained); the timestep σ; on guidance-distilled
models (dev) the embedded guidance, 1.0 by default (kohya's recommended ``--guidance_scale 1.0``, ai-toolkit's
``cfg_scale`` 1.0); the transformer's output against ε - x₀ in the packed layout (the same elements: the mean squared
error does not depend on their order).

What does not apply is refused: ``--min-snr-gamma`` and ``--noise-offset`` (an SNR weighting and an ε trick of the
DDPM objective; kohya's FLUX trainer has neither), ``--guidance`` on a model without a guidance embedding (schnell),
and FLUX.1 control/Fill models (their extra input channels need a control image).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import TrainingError
from ..keymap.arch import Arch
from ..generate.conditioning import Conditioning
from ..models.loading import BaseModel
from . import flow
from .config import TrainConfig
from .flow_loop import FlowTrainer, image_ids, pack
from .flux_network import FluxNetwork
from .loop import Trainer
from .network import Network

BASE_VERSION = "flux1"  # kohya's ss_base_model_version (library/flux_utils.py MODEL_VERSION_FLUX_V1)
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"  # kohya library/sai_model_spec.py IMPL_FLUX
SEQUENCE = {"flux-1-schnell": 256}  # T5 tokens (dev 512), as generation reads them (generate/flux_family.py)


class FluxTrainer(FlowTrainer):
    display = "FLUX.1"
    arches = (Arch.FLUX1,)

    def check_family(self) -> None:
        cfg, model = self.cfg, self.model
        if model.variant not in ("flux-1-dev", "flux-1-schnell"):
            raise TrainingError(f"the model {model.name} is {model.variant}: control and Fill models take a control "
                                "image beside the latents; lorakit trains FLUX.1 dev and schnell")
        if cfg.network.t5 and cfg.network.train == "unet":
            raise TrainingError("--train-t5 trains T5 beside CLIP-L: it needs --train te or both")
        if cfg.flow.guidance is not None and not self.guided:
            raise TrainingError(f"--guidance: {model.variant} has no guidance embedding")

    @property
    def guided(self) -> bool:
        return bool(self.model.pipe.transformer.config.guidance_embeds)

    def network(self) -> Network:
        """The flow objective's settings and kohya's FLUX network."""
        spec = self.cfg.flow
        self.guidance = (flow.DEFAULT_GUIDANCE if spec.guidance is None else spec.guidance) if self.guided else None
        self.sequence = spec.max_sequence_length or SEQUENCE.get(self.model.variant, 512)
        return FluxNetwork(self.model.pipe, self.cfg.network, self.cfg.seed, t5=self.cfg.network.t5)

    def objective_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": BASE_VERSION, "ss_model_type": "flux", "ss_v2": "False",
                "modelspec.architecture": f"{self.model.variant}/lora", "modelspec.implementation": IMPLEMENTATION,
                **flow.sampling_metadata(self.cfg.flow),
                "ss_guidance_scale": "None" if self.guidance is None else f"{self.guidance:g}",
                "ss_t5xxl_max_token_length": str(self.sequence), "ss_apply_t5_attn_mask": "False"}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        if self.cfg.network.kind == "lora":
            meta["ss_network_module"] = "networks.lora_flux"  # kohya's FLUX LoRA module
        return meta

    # -- the step ------------------------------------------------------------------------------------------
    def conditioning(self, captions: list[str]) -> Conditioning:
        """T5 embeddings (b, tokens, width) and CLIP-L's pooled output (b, width); an encoder that is not trained
        runs once per caption (cached)."""
        clip_live = self.train_te
        t5_live = self.train_te and self.cfg.network.t5
        if not (clip_live and t5_live):
            with torch.no_grad():
                for c in captions:
                    if c not in self.cond_cache:
                        self.cond_cache[c] = Conditioning(self._t5([c]), self._clip([c]))
        t5 = self._t5(captions) if t5_live else torch.cat([self.cond_cache[c].embeds for c in captions])
        cached = [self.cond_cache[c].pooled for c in captions] if not clip_live else []
        clip = self._clip(captions) if clip_live else torch.cat(cached)  # type: ignore[arg-type]
        return Conditioning(t5, clip)

    def _t5(self, captions: list[str]) -> torch.Tensor:
        pipe: Any = self.model.pipe
        out: torch.Tensor = pipe._get_t5_prompt_embeds(prompt=captions, max_sequence_length=self.sequence,
                                                       device=self.device)
        return out

    def _clip(self, captions: list[str]) -> torch.Tensor:
        pipe: Any = self.model.pipe
        out: torch.Tensor = pipe._get_clip_prompt_embeds(prompt=captions, device=self.device)
        return out

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """FLUX.1's forward: packed x_σ, σ as the timestep, T5, CLIP-L pooled and (dev) the embedded guidance."""
        dt, n = self.model.dtype, noisy.shape[0]
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=noisy.device)
        return self.denoiser(hidden_states=pack(noisy).to(dt), timestep=sigmas.to(noisy.device, dt),
                             guidance=guidance, pooled_projections=cond.pooled.to(dt),  # type: ignore[union-attr]
                             encoder_hidden_states=cond.embeds.to(dt),
                             txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=noisy.device, dtype=dt),
                             img_ids=image_ids(noisy, dt), return_dict=False)[0]


def trainer_for(cfg: TrainConfig, model: BaseModel | None = None) -> Trainer:
    """The trainer of the model's family (``model`` ``None``: ``cfg.model`` is loaded): the first flow family
    whose ``trains`` takes it, else SD1/SD2/SDXL's ``Trainer``."""
    from ..models.loading import load_model
    from .chroma_loop import ChromaTrainer
    from .qwen_loop import QwenTrainer
    from .sd3_loop import SD3Trainer

    cfg.check()
    model = model or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    families: tuple[type[FlowTrainer], ...] = (FluxTrainer, SD3Trainer, ChromaTrainer, QwenTrainer)
    cls = next((f for f in families if f.trains(model)), Trainer)
    return cls(cfg, model)
