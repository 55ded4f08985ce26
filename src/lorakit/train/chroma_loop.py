"""``lorakit train`` on Chroma (lodestones' FLUX.1-schnell derivative): the flow step of ``flow_loop.py`` with
Chroma's forward and kohya's FLUX network on its modules — what kohya sd-scripts does with
``flux_train_network.py --model_type chroma --apply_t5_attn_mask``.

One micro-batch: cached latents x₀ (FLUX.1's VAE: shifted and scaled), ε, σ, x_σ packed into 2×2 patches with their
position ids; T5's embeddings **and its attention mask** as ``ChromaPipeline._get_t5_prompt_embeds`` makes them
(the padding masked but for its first token; cached per caption unless ``--train-t5`` trains T5), the mask widened
over the image tokens as the pipeline's ``_prepare_attention_mask`` does; the timestep σ. No pooled CLIP vector and
no guidance input: the approximator (``distilled_guidance_layer``) makes every block's modulation from the
timestep (its guidance input is always 0 in diffusers' model).

The network: kohya's FLUX network (``flux_network.FluxNetwork`` with Chroma's family) on what Chroma kept — the double
blocks' ``{img,txt}_attn.qkv``/``proj``/``mlp.0``/``mlp.2`` and the single blocks' ``linear1``/``linear2``; the
pruned modulations are not in the model, so not trained. ``--only-layers`` may add ``img_in``, ``txt_in``,
``final_layer.linear`` and the approximator's layers. The file is in BFL names (``lora_unet_double_blocks_0_
img_attn_qkv``), as kohya and ai-toolkit write Chroma LoRAs, with ``ss_base_model_version`` ``chroma`` and
``modelspec.architecture`` ``chroma/lora`` (kohya's ``MODEL_VERSION_CHROMA``, ``ARCH_FLUX_1_CHROMA``).
Text encoder: T5 only, with ``--train-t5`` (and ``--train te|both``), written as ``lora_te3_`` (kohya's T5).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import TrainingError
from ..generate.conditioning import Conditioning
from ..keymap.arch import Arch
from ..keymap.families import CHROMA, Family
from . import flow
from .flow_loop import FlowTrainer, image_ids, pack
from .flux_network import FluxNetwork, bfl_modules, text_targets
from .network import Network, NetworkSpec

IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"  # kohya library/sai_model_spec.py IMPL_CHROMA
SEQUENCE = 512  # T5 tokens, as Chroma was trained and generation reads them (generate/chroma_family.py)
APPROXIMATOR = "distilled_guidance_layer"


def on_request(transformer: Any) -> tuple[str, ...]:
    """What ``--only-layers`` may add: the embedders, the final linear and the approximator's layers."""
    layers = len(transformer.distilled_guidance_layer.layers)
    return ("img_in", "txt_in", "final_layer.linear", f"{APPROXIMATOR}.in_proj",
            *(f"{APPROXIMATOR}.layers.{i}.{m}" for i in range(layers) for m in ("in_layer", "out_layer")),
            f"{APPROXIMATOR}.out_proj")


class ChromaNetwork(FluxNetwork):
    family: Family = CHROMA

    def __init__(self, pipe: Any, spec: NetworkSpec, seed: int, t5: bool = False) -> None:
        tr = pipe.transformer
        texts = text_targets(pipe, spec, t5, clips=(), t5_name="text_encoder")
        super().__init__(pipe, spec, seed, t5, originals=bfl_modules(tr, spec.only, CHROMA, on_request(tr)),
                         texts=texts)


class ChromaTrainer(FlowTrainer):
    display = "Chroma"
    arches = (Arch.CHROMA,)

    def check_family(self) -> None:
        net = self.cfg.network
        if self.cfg.flow.guidance is not None:
            raise TrainingError("--guidance: Chroma has no guidance embedding (it is used with real CFG)")
        if net.t5 and net.train == "unet":
            raise TrainingError("--train-t5 trains Chroma's T5: it needs --train te or both")
        if net.train == "te" and not net.t5:
            raise TrainingError("--train te: Chroma's only text encoder is T5, trained with --train-t5")

    @property
    def text_live(self) -> bool:
        return self.train_te and self.cfg.network.t5

    def network(self) -> Network:
        self.sequence = self.cfg.flow.max_sequence_length or SEQUENCE
        return ChromaNetwork(self.model.pipe, self.cfg.network, self.cfg.seed, t5=self.cfg.network.t5)

    def objective_metadata(self) -> dict[str, str]:
        version, architecture = CHROMA.modelspec[Arch.CHROMA]
        return {"ss_base_model_version": version, "ss_model_type": "chroma", "ss_v2": "False",
                "modelspec.architecture": f"{architecture}/lora", "modelspec.implementation": IMPLEMENTATION,
                **flow.sampling_metadata(self.cfg.flow), "ss_guidance_scale": "0",
                "ss_t5xxl_max_token_length": str(self.sequence), "ss_apply_t5_attn_mask": "True"}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        if self.cfg.network.kind == "lora":
            meta["ss_network_module"] = "networks.lora_flux"  # kohya trains Chroma with its FLUX network
        return meta

    def encode(self, captions: list[str]) -> Conditioning:
        pipe: Any = self.model.pipe
        embeds, mask = pipe._get_t5_prompt_embeds(prompt=captions, max_sequence_length=self.sequence,
                                                  device=self.device)
        return Conditioning(embeds, None, mask)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Chroma's forward: packed x_σ, σ as the timestep, T5's embeddings with the mask over text and image."""
        pipe: Any = self.model.pipe
        dt, n = self.model.dtype, noisy.shape[0]
        x = pack(noisy).to(dt)
        mask = pipe._prepare_attention_mask(batch_size=n, sequence_length=x.shape[1], dtype=dt,
                                            attention_mask=cond.mask)
        return self.denoiser(hidden_states=x, timestep=sigmas.to(noisy.device, dt),
                             encoder_hidden_states=cond.embeds.to(dt),
                             txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=noisy.device, dtype=dt),
                             img_ids=image_ids(noisy, dt), attention_mask=mask, return_dict=False)[0]
