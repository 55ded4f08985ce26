"""``lorakit train`` on Qwen-Image: the flow step of ``flow_loop.py`` with Qwen-Image's forward and musubi-tuner's
network (``networks/lora_qwen_image.py``), the trainer Qwen-Image LoRAs are mostly made with.

One micro-batch (musubi-tuner ``qwen_image_train_network.py``): latents x₀ from the 3-D VAE — the mode of frame 0,
normalised per channel by the VAE's ``latents_mean``/``latents_std`` (``models.qwen.encode``, as the pipeline
encodes an init image) — ε, σ, x_σ packed into 2×2 patches (B, h/2·w/2, 4·C), with ``img_shapes`` [(1, h/2, w/2)]
per sample for the rotary positions; the Qwen2.5-VL embeddings and their mask as ``QwenImagePipeline.encode_prompt``
makes them (the chat template, its first 34 tokens dropped; each caption at its own length, cached once, padded to
the batch's longest with the mask saying which tokens count: ``sampling.stack``, what generation does for a mixed
batch); the timestep σ (the pipeline passes t/1000). ``--timestep-sampling flux_shift`` reads μ's line from the
model's scheduler config (Qwen-Image: 0.5 at 256 tokens, 0.9 at 8192): musubi's ``qwen_shift``.

The network: every Linear of the transformer blocks except the modulations ``img_mod.1``/``txt_mod.1`` (musubi's
default ``exclude_mod``); ``--only-layers`` may add those and the top-level layers (``img_in``, ``txt_in``,
``time_text_embed…``, ``norm_out.linear``, ``proj_out``). No fused layer: Qwen-Image's files use the model's names,
written as musubi-tuner writes them (``lora_unet_transformer_blocks_0_attn_to_q``: ``Family.kohya_out``) with
``networks.lora_qwen_image``, ``ss_base_model_version`` ``qwen_image`` and ``modelspec.architecture``
``Qwen-Image/lora`` (musubi's ``ARCH_QWEN_IMAGE``). The text encoder (a 7B vision-language model) is not trained
(musubi does not): ``--train te`` and ``--train-t5`` are refused; ``--train both`` trains the transformer.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import TrainingError
from ..generate.conditioning import Conditioning
from ..keymap.arch import Arch
from ..keymap.families import QWEN_IMAGE, Family
from ..models import qwen
from . import flow
from .flow_loop import FlowTrainer, pack
from .flux_network import FluxNetwork, present_modules
from .network import Network, NetworkSpec

IMPLEMENTATION = "https://github.com/QwenLM/Qwen-Image"  # musubi-tuner utils/sai_model_spec.py IMPL_QWEN_IMAGE
MODULATIONS = ("img_mod.1", "txt_mod.1")
TOP = ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
       "norm_out.linear", "proj_out")


def qwen_modules(transformer: Any, only: tuple[str, ...]) -> list[str]:
    """The model's Linears to train, in block order: musubi's reach, or what ``--only-layers`` names."""
    paths = []
    for i, block in enumerate(transformer.transformer_blocks):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and (only or name not in MODULATIONS):
                paths.append(f"transformer_blocks.{i}.{name}")
    return present_modules(transformer, QWEN_IMAGE, paths + (list(TOP) if only else []), only)


class QwenNetwork(FluxNetwork):
    family: Family = QWEN_IMAGE

    def __init__(self, pipe: Any, spec: NetworkSpec, seed: int, t5: bool = False) -> None:
        super().__init__(pipe, spec, seed, originals=qwen_modules(pipe.transformer, spec.only), texts={})


class QwenTrainer(FlowTrainer):
    display = "Qwen-Image"
    arches = (Arch.QWEN_IMAGE,)

    def check_family(self) -> None:
        flags = [f for f in self.cfg.flow.given() if f in ("--guidance", "--max-sequence-length")]
        if self.cfg.network.t5:
            flags.append("--train-t5")
        if flags:
            raise TrainingError(f"{', '.join(flags)}: not for Qwen-Image (no guidance embedding, no T5; its "
                                "Qwen2.5-VL prompts keep their own length)")
        if self.cfg.network.train == "te":
            raise TrainingError("--train te: lorakit does not train Qwen-Image's text encoder (a 7B vision-language "
                                "model; musubi-tuner does not either): use --train unet")

    @property
    def text_live(self) -> bool:
        return False

    def network(self) -> Network:
        return QwenNetwork(self.model.pipe, self.cfg.network, self.cfg.seed)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return qwen.encode(self.model.pipe.vae, pixels)[0]

    def objective_metadata(self) -> dict[str, str]:
        version, architecture = QWEN_IMAGE.modelspec[Arch.QWEN_IMAGE]
        return {"ss_base_model_version": version, "ss_architecture": version, "ss_v2": "False",
                "modelspec.architecture": f"{architecture}/lora", "modelspec.implementation": IMPLEMENTATION,
                **flow.sampling_metadata(self.cfg.flow)}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        meta["ss_text_encoder_lr"] = "None"  # nothing of the text encoder trains
        if self.cfg.network.kind == "lora":
            meta["ss_network_module"] = "networks.lora_qwen_image"  # musubi-tuner's Qwen-Image LoRA module
        return meta

    def encode(self, captions: list[str]) -> Conditioning:
        pipe: Any = self.model.pipe
        embeds, mask = pipe.encode_prompt(prompt=captions, device=self.device)
        return Conditioning(embeds, None, mask)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Qwen-Image's forward: packed x_σ with its ``img_shapes``, σ, the embeddings and their mask."""
        dt, (n, _, h, w) = self.model.dtype, noisy.shape
        return self.denoiser(hidden_states=pack(noisy).to(dt), timestep=sigmas.to(noisy.device, dt),
                             encoder_hidden_states=cond.embeds.to(dt), encoder_hidden_states_mask=cond.mask,
                             img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False)[0]
