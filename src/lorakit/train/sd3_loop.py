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
from ..generate.conditioning import Conditioning
from ..keymap.arch import SD3_SIZES
from ..keymap.families import SD3, Family
from . import flow
from .flow_loop import FlowTrainer
from .flux_network import FluxNetwork, present_modules, text_targets
from .network import Network, NetworkSpec

JOINT = ("x_block.attn.qkv", "x_block.attn.proj", "x_block.mlp.fc1", "x_block.mlp.fc2", "x_block.adaLN_modulation.1",
         "x_block.attn2.qkv", "x_block.attn2.proj", "context_block.attn.qkv", "context_block.attn.proj",
         "context_block.mlp.fc1", "context_block.mlp.fc2", "context_block.adaLN_modulation.1")
SEQUENCE = 256  # T5 tokens, as generation reads them (generate/sd3_family.py)


def sai_modules(transformer: Any, only: tuple[str, ...]) -> list[str]:
    """The SAI modules kohya's SD3 network trains that this model has (the last block has no context output
    layers; ``attn2`` only in SD3.5-Medium's dual-attention blocks), in block order."""
    paths = [f"joint_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks)) for m in JOINT]
    return present_modules(transformer, SD3, paths, only)


class SD3Network(FluxNetwork):
    family: Family = SD3

    def __init__(self, pipe: Any, spec: NetworkSpec, seed: int, t5: bool = False) -> None:
        texts = text_targets(pipe, spec, t5, clips=("text_encoder", "text_encoder_2"), t5_name="text_encoder_3")
        super().__init__(pipe, spec, seed, t5, originals=sai_modules(pipe.transformer, spec.only), texts=texts)


class SD3Trainer(FlowTrainer):
    display = "SD3"
    arches = SD3_SIZES

    def check_family(self) -> None:
        cfg = self.cfg
        if cfg.flow.guidance is not None:
            raise TrainingError("--guidance: SD3 has no guidance embedding (it is trained with real CFG)")
        if cfg.network.t5 and cfg.network.train == "unet":
            raise TrainingError("--train-t5 trains T5 beside CLIP-L and CLIP-G: it needs --train te or both")

    def network(self) -> Network:
        pipe = self.model.pipe
        if getattr(pipe, "text_encoder_3", None) is not None:
            pipe.text_encoder_3.requires_grad_(False)  # the loop freezes the first two encoders only
        self.patch = int(pipe.transformer.config.patch_size)
        self.sequence = self.cfg.flow.max_sequence_length or SEQUENCE
        return SD3Network(pipe, self.cfg.network, self.cfg.seed, t5=self.cfg.network.t5)

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

    def encode(self, captions: list[str]) -> Conditioning:
        pipe: Any = self.model.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=captions, prompt_3=captions,
                                                  device=self.device, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.sequence)
        return Conditioning(embeds, pooled)

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        return x  # SD3's transformer patches and unpatches inside

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """SD3's forward: x_σ as it is, the timestep 1000·σ, the prompt embeddings and pooled projection."""
        dt = self.model.dtype
        return self.denoiser(hidden_states=noisy.to(dt), timestep=(sigmas * 1000).to(noisy.device, dt),
                             encoder_hidden_states=cond.embeds.to(dt),
                             pooled_projections=cond.pooled.to(dt),  # type: ignore[union-attr]
                             return_dict=False)[0]
