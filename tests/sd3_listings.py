"""Key → shape listings of full-size SD3 / SD3.5 LoRA files in every dialect of ROUND3_NOTES §2.2, written from the
key patterns there and the sizes of §2.1 (no real-file listing exists): the fixtures of the meta-device tests are
made from these, filled with zeros. Nothing here reads lorakit's tables."""
from __future__ import annotations

from dataclasses import dataclass

import torch

Listing = dict[str, tuple[int, ...]]
R = 4  # rank of every layer


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    attn2: tuple[int, ...] = ()
    modelspec: str = ""


SIZES = {"sd3-medium": Size("sd3-medium", 1536, 24, (), "stable-diffusion-3-medium/lora"),
         "sd3.5-medium": Size("sd3.5-medium", 1536, 24, tuple(range(13)), "stable-diffusion-3-5-medium/lora"),
         "sd3.5-large": Size("sd3.5-large", 2432, 38, (), "stable-diffusion-3-5-large/lora")}


def sai_modules(s: Size, embedders: bool = True) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """SAI module → (out rows, in width, kernel) of every layer kohya's SD3 network (with ``emb_dims``) trains."""
    h = s.hidden
    out: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    for i in range(s.layers):
        last = i == s.layers - 1
        j = f"joint_blocks.{i}."
        out[j + "x_block.attn.qkv"] = (3 * h, h, ())
        out[j + "x_block.attn.proj"] = (h, h, ())
        out[j + "x_block.mlp.fc1"] = (4 * h, h, ())
        out[j + "x_block.mlp.fc2"] = (h, 4 * h, ())
        out[j + "x_block.adaLN_modulation.1"] = ((9 if i in s.attn2 else 6) * h, h, ())
        out[j + "context_block.attn.qkv"] = (3 * h, h, ())
        out[j + "context_block.adaLN_modulation.1"] = ((2 if last else 6) * h, h, ())
        if not last:
            out[j + "context_block.attn.proj"] = (h, h, ())
            out[j + "context_block.mlp.fc1"] = (4 * h, h, ())
            out[j + "context_block.mlp.fc2"] = (h, 4 * h, ())
        if i in s.attn2:
            out[j + "x_block.attn2.qkv"] = (3 * h, h, ())
            out[j + "x_block.attn2.proj"] = (h, h, ())
    if embedders:
        out.update({"context_embedder": (h, 4096, ()), "t_embedder.mlp.0": (h, 256, ()), "t_embedder.mlp.2": (h, h, ()),
                    "y_embedder.mlp.0": (h, 2048, ()), "y_embedder.mlp.2": (h, h, ()),
                    "x_embedder.proj": (h, 16, (2, 2)), "final_layer.linear": (64, h, ()),
                    "final_layer.adaLN_modulation.1": (2 * h, h, ())})
    return out


def diffusers_modules(s: Size) -> dict[str, tuple[int, int]]:
    """diffusers module → (out, in) of the attention layers diffusers' ``train_dreambooth_lora_sd3`` trains (its
    default targets: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out) plus SD3.5-Medium's attn2."""
    h = s.hidden
    out: dict[str, tuple[int, int]] = {}
    for i in range(s.layers):
        d = f"transformer_blocks.{i}."
        for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj") + (() if i == s.layers - 1 else ("attn.to_add_out",)):
            out[d + m] = (h, h)
        if i in s.attn2:
            out.update({d + m: (h, h) for m in ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")})
    return out


def text_modules(clip_l: bool = True, clip_g: bool = True, t5: bool = True) -> dict[str, dict[str, tuple[int, int]]]:
    """Per encoder: HF module path → (out, in) of the attention and MLP Linears (CLIP-L 12×768, CLIP-G 32×1280,
    T5-XXL 24×4096 with its gated MLP 10240)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name, on, layers, w, mlp in (("clip_l", clip_l, 12, 768, 3072), ("clip_g", clip_g, 32, 1280, 5120)):
        if on:
            out[name] = {}
            for i in range(layers):
                p = f"text_model.encoder.layers.{i}."
                out[name].update({p + f"self_attn.{x}_proj": (w, w) for x in "qkvo" if x != "o"})
                out[name].update({p + "self_attn.out_proj": (w, w), p + "mlp.fc1": (mlp, w), p + "mlp.fc2": (w, mlp)})
    if t5:
        out["t5xxl"] = {}
        for i in range(24):
            b = f"encoder.block.{i}.layer."
            out["t5xxl"].update({b + f"0.SelfAttention.{x}": (4096, 4096) for x in "qkvo"})
            out["t5xxl"].update({b + "1.DenseReluDense.wi_0": (10240, 4096), b + "1.DenseReluDense.wi_1": (10240, 4096),
                                 b + "1.DenseReluDense.wo": (4096, 10240)})
    return out


def _lora(prefix: str, out: int, inp: int, kernel: tuple[int, ...] = (), peft: bool = False,
          alpha: bool = True) -> Listing:
    down, up = ("lora_A.weight", "lora_B.weight") if peft else ("lora_down.weight", "lora_up.weight")
    listing: Listing = {f"{prefix}.{down}": (R, inp, *kernel), f"{prefix}.{up}": (out, R, *[1] * len(kernel))}
    if alpha:
        listing[f"{prefix}.alpha"] = ()
    return listing


_TE_KOHYA = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
_TE_DIFFUSERS = {"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}  # diffusers never targets T5


def listing(dialect: str, s: Size) -> tuple[Listing, dict[str, str]]:
    """A file of ``dialect`` for size ``s``: (key → shape, metadata)."""
    out: Listing = {}
    meta: dict[str, str] = {}
    if dialect in ("kohya", "kohya-split-qkv"):
        for m, (o, i, k) in sai_modules(s).items():
            split = dialect == "kohya-split-qkv" and m.endswith("qkv")
            layer = _lora("lora_unet_" + m.replace(".", "_"), o, i, k)
            if split:  # the combined form of split_qkv: a block-diagonal up (3h, 3r), down (3r, h)
                layer = {key: ((3 * R, *shape[1:]) if "down" in key else (shape[0], 3 * R, *shape[2:]))
                         if shape else shape for key, shape in layer.items()}
            out.update(layer)
        for enc, mods in text_modules().items():
            for m, (o, i) in mods.items():
                out.update(_lora(_TE_KOHYA[enc] + m.replace(".", "_"), o, i))
        meta = {"modelspec.architecture": s.modelspec, "ss_network_module": "networks.lora_sd3"}
    elif dialect in ("diffusers", "peft-raw", "simpletuner"):
        prefix = {"diffusers": "transformer.", "peft-raw": "base_model.model.",
                  "simpletuner": "transformer.base_model.model."}[dialect]
        for m, (o, i) in diffusers_modules(s).items():
            out.update(_lora(prefix + m, o, i, peft=True, alpha=False))
        if dialect == "diffusers":
            for enc, mods in text_modules(t5=False).items():
                for m, (o, i) in mods.items():
                    out.update(_lora(_TE_DIFFUSERS[enc] + m, o, i, peft=True, alpha=False))
            meta = {"lora_adapter_metadata": '{"transformer.lora_alpha": 2, "transformer.r": 4}'}
    elif dialect == "onetrainer":
        for m, (o, i) in diffusers_modules(s).items():
            out.update(_lora("lora_transformer_" + m.replace(".", "_"), o, i))
        for enc, mods in text_modules().items():
            for m, (o, i) in mods.items():
                out.update(_lora(_TE_KOHYA[enc] + m.replace(".", "_"), o, i))
        out.update(_lora("lora_te1_text_projection", 768, 768))
        out.update(_lora("lora_te2_text_projection", 1280, 1280))
    elif dialect == "lycoris":  # SimpleTuner's LyCORIS LoKr: factor 8 on the rows, the rest in w2
        for m, (o, i) in diffusers_modules(s).items():
            p = "lycoris_" + m.replace(".", "_")
            out.update({f"{p}.lokr_w1": (8, 8), f"{p}.lokr_w2": (o // 8, i // 8), f"{p}.alpha": ()})
    elif dialect == "comfyui":
        for m, (o, i, k) in sai_modules(s).items():
            out.update(_lora("diffusion_model." + m, o, i, k, peft=True))
        for enc, mods in text_modules().items():
            for m, (o, i) in mods.items():
                out.update(_lora(f"text_encoders.{enc}.transformer.{m}", o, i, peft=True))
    else:
        raise ValueError(dialect)
    return out, meta


def zeros(listing: Listing) -> dict[str, torch.Tensor]:
    """The listing filled: zeros, α = 2."""
    return {k: torch.tensor(2.0) if not shape else torch.zeros(shape) for k, shape in listing.items()}


DIALECTS = ("kohya", "kohya-split-qkv", "diffusers", "peft-raw", "simpletuner", "onetrainer", "lycoris", "comfyui")
