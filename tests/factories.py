"""Random LoRA tensors of every network type for any layer, and tiny models built from configs."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from lorakit.generate.tokenizer import PAD_OPENCLIP, clip_tokenizer

KINDS = ["lora", "locon-tucker", "loha", "loha-tucker", "lokr", "lokr-decomposed", "lokr-tucker", "ia3", "ia3-input",
         "glora", "glora-old", "oft", "oft-diag-old", "boft", "full", "dora-out", "dora-in", "doha", "dokr"]
NORM_KINDS = ["norm"]


def _r(gen: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _factor(n: int) -> tuple[int, int]:
    """n = a·b with a the largest divisor ≤ √n."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def adapter_tensors(kind: str, shape: torch.Size | tuple[int, ...], rank: int = 4,
                    gen: torch.Generator | None = None, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS leaf tensors of ``kind`` for a weight of ``shape`` ((out, in) or (out, in, k, k))."""
    g = gen or torch.Generator().manual_seed(0)
    out, inp, *k = shape
    kk = 1
    for s in k:
        kk *= s
    a = torch.tensor(float(alpha if alpha is not None else rank / 2))
    if kind == "norm":
        return {"w_norm": _r(g, out), "b_norm": _r(g, out)}
    if kind == "lora":
        return {"lora_down.weight": _r(g, rank, inp, *k), "lora_up.weight": _r(g, out, rank, *[1] * len(k)),
                "alpha": a}
    if kind == "locon-tucker":
        if not k:
            return adapter_tensors("lora", shape, rank, g, alpha)
        return {"lora_down.weight": _r(g, rank, inp, 1, 1), "lora_mid.weight": _r(g, rank, rank, *k),
                "lora_up.weight": _r(g, out, rank, 1, 1), "alpha": a}
    if kind in ("loha", "doha"):
        t = {"hada_w1_a": _r(g, out, rank), "hada_w1_b": _r(g, rank, inp * kk), "hada_w2_a": _r(g, out, rank),
             "hada_w2_b": _r(g, rank, inp * kk), "alpha": a}
        return _with_dora(t, kind == "doha", shape, g, True)
    if kind == "loha-tucker":
        if not k:
            return adapter_tensors("loha", shape, rank, g, alpha)
        return {"hada_t1": _r(g, rank, rank, *k), "hada_w1_a": _r(g, rank, out), "hada_w1_b": _r(g, rank, inp),
                "hada_t2": _r(g, rank, rank, *k), "hada_w2_a": _r(g, rank, out), "hada_w2_b": _r(g, rank, inp),
                "alpha": a}
    if kind in ("lokr", "lokr-decomposed", "lokr-tucker", "dokr"):
        return _lokr(kind, shape, rank, g, a)
    if kind in ("ia3", "ia3-input"):
        on_input = kind == "ia3-input"
        n = inp if on_input else out
        return {"weight": _r(g, n), "on_input": torch.tensor(int(on_input))}
    if kind in ("glora", "glora-old"):
        if kind == "glora":
            return {"a1.weight": _r(g, inp, rank), "a2.weight": _r(g, rank, inp), "b1.weight": _r(g, out, rank),
                    "b2.weight": _r(g, rank, inp * kk), "alpha": a}
        return {"a1.weight": _r(g, rank, inp), "a2.weight": _r(g, inp, rank), "b1.weight": _r(g, rank, inp * kk),
                "b2.weight": _r(g, out, rank), "alpha": a}
    if kind in ("oft", "oft-diag-old"):
        b, n = _factor(out)
        if kind == "oft":
            return {"oft_blocks": _r(g, n, b, b, std=0.05), "alpha": torch.tensor(0.0)}
        return {"oft_diag": torch.eye(b).repeat(n, 1, 1) + _r(g, n, b, b, std=0.05)}  # old files store R itself
    if kind == "boft":
        if out % 2:
            return adapter_tensors("oft", shape, rank, g, alpha)
        b = 2
        n = out // b
        stages = max(1, (n - 1).bit_length())
        if n & (n - 1):  # butterfly needs a power-of-two block count; fall back to one stage
            stages = 1
        return {"oft_blocks": _r(g, stages, n, b, b, std=0.05), "alpha": torch.tensor(0.0)}
    if kind == "full":
        return {"diff": _r(g, *shape, std=0.01), "diff_b": _r(g, out, std=0.01)}
    if kind in ("dora-out", "dora-in"):
        return _with_dora(adapter_tensors("lora", shape, rank, g, alpha), True, shape, g, kind == "dora-out")
    raise ValueError(kind)


def _lokr(kind: str, shape: tuple[int, ...], rank: int, g: torch.Generator, a: torch.Tensor) -> dict[str, torch.Tensor]:
    out, inp, *k = shape
    o1, o2 = _factor(out)
    i1, i2 = _factor(inp)
    t: dict[str, torch.Tensor] = {"lokr_w1": _r(g, o1, i1)}
    if kind == "lokr":
        t["lokr_w2"] = _r(g, o2, i2, *k)
    elif kind == "lokr-tucker" and k:
        t.update({"lokr_t2": _r(g, rank, rank, *k), "lokr_w2_a": _r(g, rank, o2), "lokr_w2_b": _r(g, rank, i2)})
        t["alpha"] = a
    else:
        t = {"lokr_w1_a": _r(g, o1, rank), "lokr_w1_b": _r(g, rank, i1), "lokr_w2_a": _r(g, o2, rank),
             "lokr_w2_b": _r(g, rank, i2, *k), "alpha": a}
    return _with_dora(t, kind == "dokr", shape, g, True)


def _with_dora(t: dict[str, torch.Tensor], on: bool, shape: tuple[int, ...], g: torch.Generator,
               per_output: bool) -> dict[str, torch.Tensor]:
    if not on:
        return t
    out, inp, *k = shape
    mag_shape = (out, 1, *[1] * len(k)) if per_output else (1, inp, *[1] * len(k))
    t["dora_scale"] = 1.0 + torch.rand(*mag_shape, generator=g)
    return t


def kohya_name(canonical_path: str, sdxl: bool = False) -> str:
    """The kohya module name real files use for a canonical path (text encoders under ``text_model``)."""
    component, _, path = canonical_path.partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
              "text_encoder_2": "lora_te2_"}[component]
    if component.startswith("text_encoder"):
        path = "text_model." + path
    return prefix + path.replace(".", "_")


def layer_paths(components: Mapping[str, torch.nn.Module], convs: bool = True) -> dict[str, torch.nn.Module]:
    """Canonical path → module for every Linear (and Conv2d) of every component."""
    kinds: tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    out = {}
    for component, root in components.items():
        for name, module in root.named_modules():
            if isinstance(module, kinds):
                path = name[len("text_model."):] if name.startswith("text_model.") else name
                out[f"{component}.{path}"] = module
    return out


def make_kohya_lora(components: Mapping[str, torch.nn.Module], kind: str | Callable[[str], str | None] = "lora",
                    rank: int = 4, seed: int = 0, convs: bool = True, alpha: float | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random kohya-named LoRA state dict for every Linear/Conv of ``components``. ``kind`` may be a function of
    the canonical path (``None`` skips the layer)."""
    gen = torch.Generator().manual_seed(seed)
    sdxl = "text_encoder_2" in components
    sd = {}
    for path, module in layer_paths(components, convs).items():
        k = kind(path) if callable(kind) else kind
        if k is None:
            continue
        for leaf, t in adapter_tensors(k, tuple(module.weight.shape), rank, gen, alpha).items():
            sd[f"{kohya_name(path, sdxl)}.{leaf}"] = t.to(dtype) if t.is_floating_point() else t
    return sd


def tiny_components(arch: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """Tiny UNet + text encoder(s) with the layer kinds of the real ones (attention, GEGLU, resnets, conv)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    te_cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, vocab_size=1000, projection_dim=32,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    sdxl = arch == "sdxl"
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") if sdxl else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D") if sdxl else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if sdxl else 32, attention_head_dim=8, transformer_layers_per_block=2 if sdxl else 1,
        addition_embed_type="text_time" if sdxl else None, addition_time_embed_dim=8 if sdxl else None,
        projection_class_embeddings_input_dim=32 + 6 * 8 if sdxl else None)
    out: dict[str, torch.nn.Module] = {"unet": unet, "text_encoder": CLIPTextModel(CLIPTextConfig(**te_cfg))}
    if sdxl:
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg))
    return {k: v.to(dtype).eval() for k, v in out.items()}


def tiny_sdxl_pipeline() -> object:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    te_cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=49408, max_position_embeddings=77, projection_dim=32)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, transformer_layers_per_block=2, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**te_cfg)), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg)), tokenizer_2=clip_tokenizer(PAD_OPENCLIP),
        unet=unet, scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1))


def tiny_sd2_pipeline() -> object:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"))
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(PAD_OPENCLIP), unet=unet,
                                   scheduler=EulerDiscreteScheduler(prediction_type="v_prediction", steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sd1_pipeline() -> object:
    """A tiny SD1-layout pipeline (cross-attention 32, CLIP with the real vocabulary, a 2-block VAE; Euler a)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit.generate.samplers import scheduler_for

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=49408, max_position_embeddings=77))
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=te.eval(), tokenizer=clip_tokenizer(),
                                   unet=unet.eval(), scheduler=scheduler_for("Euler a"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def fused_sum(w32: torch.Tensor, adapters: list[tuple[object, float]]) -> torch.Tensor:
    """fp32(W) + Σ mᵢ·ΔWᵢ summed as lorakit's fused path sums a weight: a plain LoRA/LoCon (two factors) as
    ``acc.addmm_(up, down, alpha=s·m)`` — the GEMM rounded once into the sum —, every other type ``acc + ΔWᵢ`` with
    ΔWᵢ read from the original W. Written out here as the reference the quantized merge is compared with."""
    acc = w32.clone()
    for adapter, m in adapters:
        factors = adapter.low_rank()  # type: ignore[attr-defined]
        if factors is None:
            acc = acc + adapter.delta(w32, m)  # type: ignore[attr-defined]
        else:
            up, down, s = factors
            acc.view(acc.shape[0], -1).addmm_(up, down, alpha=s * m)
    return acc
