"""``lorakit train`` on SD3 / SD3.5: the ``Trainer`` of ``loop.py`` with the flow-matching objective shared with
FLUX.1 (``flow.py``: x_σ = (1-σ)·x₀ + σ·ε, the transformer's output against ε - x₀, unweighted), SD3's conditioning
and kohya's SD3 network (``networks/lora_sd3.py``): one network per SAI module of the joint blocks — the fused
``qkv`` (3·h rows) and the last block's 2·h context adaLN (halves swapped) included — split onto the diffusers
modules as a loaded file is (``flux_network.FluxNetwork`` with SD3's family). The file is a kohya SD3 LoRA in SAI
names (``lora_unet_joint_blocks_0_x_block_attn_qkv``).

One micro-batch (kohya sd-scripts ``sd3_train_network.py``): cached latents x₀ (the VAE's mean, shifted and scaled),
ε, σ per sample, x_σ; the prompt embeddings and pooled projection as ``StableDiffusion3Pipeline.encode_prompt``
makes them (CLIP-L + CLIP-G + T5; cached per caption unless a text encoder is trained); the timestep 1000·σ (the
SD3 transformer's scale, as the pipeline passes the scheduler's timesteps). Text encoders (``--train te|both``):
CLIP-L and CLIP-G; T5 with ``--train-t5``. Refused: ``--min-snr-gamma``, ``--noise-offset`` (ε/v tricks) and
``--guidance`` (SD3 has no guidance embedding).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import TrainingError
from ..keymap import sd3 as sd3map
from ..keymap.arch import SD3_SIZES
from ..keymap.families import SD3, Family
from . import diffusion as dif
from . import flow
from .flux_network import FluxNetwork, _kept, text_targets
from .loop import Trainer
from .network import Network, NetworkSpec

JOINT = ("x_block.attn.qkv", "x_block.attn.proj", "x_block.mlp.fc1", "x_block.mlp.fc2", "x_block.adaLN_modulation.1",
         "x_block.attn2.qkv", "x_block.attn2.proj", "context_block.attn.qkv", "context_block.attn.proj",
         "context_block.mlp.fc1", "context_block.mlp.fc2", "context_block.adaLN_modulation.1")
SEQUENCE = 256  # T5 tokens, as generation reads them (generate/sd3_family.py)


def sai_modules(transformer: Any, only: tuple[str, ...]) -> list[str]:
    """The SAI modules kohya's SD3 network trains that this model has (the last block has no context output
    layers; ``attn2`` only in SD3.5-Medium's dual-attention blocks), in block order."""
    names = dict(transformer.named_modules())
    out = []
    for i in range(len(transformer.transformer_blocks)):
        for m in JOINT:
            path = f"joint_blocks.{i}.{m}"
            target = sd3map.MAP.to_model(path)
            parts = [target] if isinstance(target, str) else list(target.targets) if target is not None else []
            if parts and all(p in names for p in parts) and _kept(f"transformer.{path}", only):
                out.append(path)
    return out


class SD3Network(FluxNetwork):
    family: Family = SD3

    def __init__(self, pipe: Any, spec: NetworkSpec, seed: int, t5: bool = False) -> None:
        texts = text_targets(pipe, spec, t5, clips=("text_encoder", "text_encoder_2"), t5_name="text_encoder_3")
        super().__init__(pipe, spec, seed, t5, originals=sai_modules(pipe.transformer, spec.only), texts=texts)


class SD3Trainer(Trainer):
    def check_model(self) -> None:
        cfg, model = self.cfg, self.model
        if model.arch not in SD3_SIZES:
            raise TrainingError(f"the model {model.name} is not SD3 ({model.arch})")
        refused = [flag for flag, v in (("--min-snr-gamma", cfg.min_snr_gamma), ("--noise-offset", cfg.noise_offset),
                                        ("--guidance", cfg.flow.guidance)) if v]
        if refused:
            raise TrainingError(f"{', '.join(refused)}: not for SD3, which is trained on the flow-matching velocity, "
                                "unweighted, and has no guidance embedding (see --timestep-sampling)")
        if cfg.network.t5 and cfg.network.train == "unet":
            raise TrainingError("--train-t5 trains T5 beside CLIP-L and CLIP-G: it needs --train te or both")

    def setup(self) -> Network:
        spec = self.cfg.flow
        pipe = self.model.pipe
        if getattr(pipe, "text_encoder_3", None) is not None:
            pipe.text_encoder_3.requires_grad_(False)  # the loop freezes the first two encoders only
        self.dynamic = flow.dynamic_shift(pipe.scheduler)
        self.sequence = spec.max_sequence_length or SEQUENCE
        return SD3Network(pipe, self.cfg.network, self.cfg.seed, t5=self.cfg.network.t5)

    @property
    def denoiser(self) -> Any:
        return self.model.pipe.transformer

    def objective_metadata(self) -> dict[str, str]:
        version, architecture = SD3.modelspec[self.model.arch]
        return {"ss_base_model_version": version, "ss_model_type": "sd3", "ss_v2": "False",
                "modelspec.architecture": f"{architecture}/lora", **flow.sampling_metadata(self.cfg.flow),
                "ss_t5xxl_max_token_length": str(self.sequence)}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        if self.cfg.network.kind == "lora":
            meta["ss_network_module"] = "networks.lora_sd3"
        return meta

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pipe: Any = self.model.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=captions, prompt_3=captions,
                                                  device=self.device, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.sequence)
        return embeds, pooled

    def _conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_te:
            return self._encode(captions)
        with torch.no_grad():
            for c in captions:
                if c not in self.text_cache:
                    self.text_cache[c] = self._encode([c])
        pooled = [self.text_cache[c][1] for c in captions]
        return torch.cat([self.text_cache[c][0] for c in captions]), torch.cat(pooled)  # type: ignore[arg-type]

    def loss(self, batch: list[int]) -> torch.Tensor:
        """The flow-matching loss of one micro-batch."""
        transformer, dt = self.model.pipe.transformer, self.model.dtype
        x0 = torch.stack([self.samples[i].latent for i in batch])
        n, _, h, w = x0.shape
        patch = int(transformer.config.patch_size)
        noise = dif.sample_noise(x0, self.gen)
        sigmas = flow.sample_sigmas(n, self.cfg.flow, self.gen, (h // patch) * (w // patch), self.dynamic)
        noisy = flow.add_noise(x0, noise, sigmas)
        embeds, pooled = self._conditioning(self._captions(batch))
        pred = transformer(hidden_states=noisy.to(dt), timestep=(sigmas * 1000).to(x0.device, dt),
                           encoder_hidden_states=embeds.to(dt), pooled_projections=pooled.to(dt),
                           return_dict=False)[0]
        return dif.diffusion_loss(pred, flow.target(x0, noise))
