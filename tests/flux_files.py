"""Small LoRA files of FLUX.1 and of the families lorakit names but does not apply, for the library, ``list``,
``inspect``, the API and the page: real key names (ROUND3_NOTES §1.2) at the tiny model's widths (hidden 32), so
the loader reads them as it reads real ones."""
from __future__ import annotations

from pathlib import Path

import torch

from lorakit.files.io import save_file

H = 32  # hidden width, as the tiny transformer's (tests/flux_factories.py)


def lora(module: str, out: int, inp: int, rank: int = 4, sep: str = ".", peft: bool = False) -> dict[str, torch.Tensor]:
    """One LoRA module's leaves (kohya ``lora_down``/``lora_up``/``alpha``, or PEFT ``lora_A``/``lora_B``)."""
    g = torch.Generator().manual_seed(len(module))
    down, up = torch.randn(rank, inp, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1
    if peft:
        return {f"{module}{sep}lora_A.weight": down, f"{module}{sep}lora_B.weight": up}
    return {f"{module}{sep}lora_down.weight": down, f"{module}{sep}lora_up.weight": up,
            f"{module}{sep}alpha": torch.tensor(float(rank))}


def kohya_flux(path: Path, *, double: int = 2, single: int = 2, guidance: bool = False, img_in: int | None = None,
               clip_layers: int = 0, t5: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """A kohya FLUX.1 LoRA in the BFL layout: fused ``qkv``/``linear1``, the final adaLN; optionally ``guidance_in``
    (dev), a widened ``img_in`` (control 128 / Fill 384 inputs), CLIP-L layers (``lora_te1_``) and one T5 layer
    under ``t5`` (kohya ``lora_te3_``, OneTrainer ``lora_te2_``)."""
    sd: dict[str, torch.Tensor] = {}
    for i in range(double):
        sd |= lora(f"lora_unet_double_blocks_{i}_img_attn_qkv", 3 * H, H)
        sd |= lora(f"lora_unet_double_blocks_{i}_img_attn_proj", H, H)
        sd |= lora(f"lora_unet_double_blocks_{i}_txt_attn_qkv", 3 * H, H)
    for j in range(single):
        sd |= lora(f"lora_unet_single_blocks_{j}_linear1", 3 * H + 4 * H, H)
        sd |= lora(f"lora_unet_single_blocks_{j}_linear2", H, 5 * H)
    sd |= lora("lora_unet_final_layer_adaLN_modulation_1", 2 * H, H)
    if guidance:
        sd |= lora("lora_unet_guidance_in_in_layer", H, 256)
    if img_in:
        sd |= lora("lora_unet_img_in", H, img_in)
    for n in range(clip_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd |= lora(f"lora_te1_text_model_encoder_layers_{n}_self_attn_{proj}", H, H)
    if t5:
        sd |= lora(f"{t5}encoder_block_0_layer_0_SelfAttention_q", H, H)
    save_file(sd, path, metadata)
    return path


def diffusers_flux(path: Path) -> Path:
    """A diffusers/PEFT FLUX.1 LoRA (the model's own names: nothing fused) with a T5 (``text_encoder_2``) layer."""
    sd: dict[str, torch.Tensor] = {}
    for part in ("to_q", "to_k", "to_v"):
        sd |= lora(f"transformer.transformer_blocks.0.attn.{part}", H, H, peft=True)
        sd |= lora(f"transformer.single_transformer_blocks.0.attn.{part}", H, H, peft=True)
    sd |= lora("transformer.single_transformer_blocks.0.proj_mlp", 4 * H, H, peft=True)
    sd |= lora("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", H, H, peft=True)
    save_file(sd, path)
    return path


def chroma(path: Path) -> Path:
    """A Chroma LoRA: FLUX.1's BFL names, no modulation layers, a ``distilled_guidance_layer``."""
    sd = lora("diffusion_model.double_blocks.0.img_attn.qkv", 3 * H, H, peft=True)
    sd |= lora("diffusion_model.distilled_guidance_layer.in_proj", H, H, peft=True)
    save_file(sd, path, {"modelspec.architecture": "chroma/lora"})
    return path


def flux2(path: Path) -> Path:
    """A FLUX.2 LoRA (diffusers names only FLUX.2 has)."""
    sd = lora("transformer.double_stream_modulation_img.linear", 6 * H, H, peft=True)
    sd |= lora("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", 9 * H, H, peft=True)
    save_file(sd, path)
    return path


def sd3(path: Path) -> Path:
    """An SD3 LoRA in the diffusers layout (top-level ``transformer_blocks`` of width 1536 and 24 of them)."""
    sd: dict[str, torch.Tensor] = {}
    for i in range(24):
        sd |= lora(f"transformer.transformer_blocks.{i}.attn.to_q", 1536, 1536, rank=1, peft=True)
    save_file(sd, path)
    return path
