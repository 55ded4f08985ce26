"""Reader fixes found while writing FLUX.1 files: a kohya ``dora_scale`` beside PEFT-style ``lora_A``/``lora_B``
keys keeps its own shape (ComfyUI reads both spellings), and ComfyUI's text-encoder names under ``lora_A`` keys."""
from __future__ import annotations

import torch

from lorakit.adapters import DoRA
from lorakit.lora_model import lora_from_state_dict
from tests.factories import adapter_tensors
from tests.flux_factories import H


def test_per_input_dora_scale_beside_lora_a_keys_stays_per_input() -> None:
    t = adapter_tensors("dora-in", (H, H), 4, torch.Generator().manual_seed(0))  # square: shapes cannot tell
    assert t["dora_scale"].shape == (1, H)
    names = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    sd = {f"diffusion_model.double_blocks.0.img_attn.proj.{names.get(k, k)}": v for k, v in t.items()}
    layer = lora_from_state_dict(sd, {}).layers["transformer.transformer_blocks.0.attn.to_out.0"]
    assert isinstance(layer, DoRA) and not layer.per_output
    peft = {k.replace("dora_scale", "lora_magnitude_vector"): v.flatten() if "dora" in k else v for k, v in sd.items()}
    layer = lora_from_state_dict(peft, {}).layers["transformer.transformer_blocks.0.attn.to_out.0"]
    assert isinstance(layer, DoRA) and layer.per_output  # PEFT's own magnitude is per output


def test_comfy_text_encoder_names_with_lora_a_keys() -> None:
    g = torch.Generator().manual_seed(1)
    sd = {"diffusion_model.img_in.lora_A.weight": torch.randn(2, 4, generator=g),
          "diffusion_model.img_in.lora_B.weight": torch.randn(H, 2, generator=g),
          "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
              torch.randn(2, 32, generator=g),
          "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight":
              torch.randn(32, 2, generator=g),
          "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight":
              torch.randn(2, 32, generator=g),
          "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight":
              torch.randn(32, 2, generator=g)}
    lora = lora_from_state_dict(sd, {})
    assert sorted(lora.layers) == ["text_encoder.encoder.layers.0.self_attn.q_proj",
                                   "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
                                   "transformer.x_embedder"] and lora.leftovers == []
