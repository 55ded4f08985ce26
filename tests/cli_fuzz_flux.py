"""FLUX.1 and quantized inputs of the CLI fuzz harness, cheap: the tiny FLUX.1 of ``flux_factories`` as a diffusers
folder, as BFL transformer-only files (the base, a tuned copy, one with a NaN) and as a GGUF file (Q8_0, city96's
BFL layout), plus broken ones (a GGUF cut short, one in a type lorakit cannot dequantize, a BFL file with a wrong
shape); FLUX.1 LoRAs in kohya BFL names (every layer, fused ``qkv``/``linear1`` included), one for a wider model,
and one with NaN factors."""
from __future__ import annotations

from pathlib import Path

import torch

from lorakit.files.io import save_file

from .flux_factories import bfl_lora, bfl_state, kohya_keys, tiny_flux_pipeline, wide_qkv_lora


def flux_inputs(d: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(LoRAs, models) under ``d``, keyed as the workspace's tokens name them (``{lora:flux}``, ``{model:flux}``); the
    LoRA folder of prompts' tags is ``loras["flux"].parent``."""
    from .test_quant_files import write_gguf

    pipe = tiny_flux_pipeline()
    tr = pipe.transformer  # type: ignore[attr-defined]
    (d / "loras").mkdir(parents=True, exist_ok=True)  # the LoRA folder of FLUX prompts: <lora:flux_style:1>
    loras = {"flux": d / "loras" / "flux_style.safetensors", "flux_wide": d / "flux_wide.safetensors",
             "flux_nan": d / "loras" / "flux_nan.safetensors"}
    layers = bfl_lora(tr, "lora", rank=2, seed=7)
    save_file(kohya_keys(layers), loras["flux"])
    save_file(wide_qkv_lora(), loras["flux_wide"])
    save_file({k: v.fill_(float("nan")) if k.endswith("up.weight") else v for k, v in kohya_keys(layers).items()},
              loras["flux_nan"])
    models = {"flux": d / "flux", "flux_bfl": d / "flux1-tiny.safetensors", "flux_tuned": d / "flux1-tuned.safetensors",
              "flux_gguf": d / "flux1-tiny-Q8_0.gguf", "flux_cut_gguf": d / "cut.gguf", "flux_tq_gguf": d / "tq.gguf",
              "flux_bad_shape": d / "bad-shape.safetensors", "flux_nan": d / "flux1-nan.safetensors"}
    pipe.save_pretrained(models["flux"])  # type: ignore[attr-defined]
    state = bfl_state(tr)
    save_file(state, models["flux_bfl"])
    gen = torch.Generator().manual_seed(11)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v for k, v in state.items()},
              models["flux_tuned"])
    save_file({k: v.clone().fill_(float("nan")) if k == "double_blocks.0.img_attn.qkv.weight" else v
               for k, v in state.items()}, models["flux_nan"])
    save_file({**state, "double_blocks.0.img_attn.proj.weight": torch.zeros(16, 64)}, models["flux_bad_shape"])
    write_gguf(models["flux_gguf"], state, "Q8_0")
    raw = models["flux_gguf"].read_bytes()
    models["flux_cut_gguf"].write_bytes(raw[:len(raw) - 4000])
    write_gguf(models["flux_tq_gguf"], state, "TQ1_0")
    return loras, models
