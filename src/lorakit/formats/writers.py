"""Writers: the canonical form → the state dict of a target dialect, the inverse of the readers, so that reading a
written file gives the same groups back, tensor for tensor.

- ``to_kohya``: every network type. ``lora_unet_<flat path>.<leaf>``; text encoders ``lora_te_`` (SD1/SD2) or
  ``lora_te1_``/``lora_te2_`` (SDXL) with their paths under ``text_model``, as files in the wild; the UNet in
  diffusers names or LDM/SGM names (sd-scripts' SDXL layout). A PEFT ``scale`` (α/r) becomes ``alpha`` = scale·r.
- ``to_peft``: what diffusers' ``save_lora_weights`` writes — PEFT state dicts per component,
  ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` / ``lora_magnitude_vector`` — with α, r and the target modules
  per component in the ``lora_adapter_metadata`` header key (the ``LoraConfig`` arguments diffusers passes on), so
  diffusers and PEFT apply the right scale. Only LoRA/LoCon layers (optionally DoRA, per output) exist in this
  format; anything else is a ``ToolError``.
"""
from __future__ import annotations

import json
import math
from collections import Counter

import torch

from ..errors import ToolError
from ..keymap.arch import Arch
from ..keymap.families import Family, family_of_arch
from ..keymap.ldm import diffusers_to_ldm
from ..keymap.names import unflatten
from .base import Grouped, component_path
from .peft import pattern_matches

StateDict = dict[str, torch.Tensor]
ATTN_UP_BLOCKS: dict[str, tuple[int, ...]] = {Arch.SDXL: (0, 1)}  # up blocks with attentions (where the LDM upsampler sits at .2)
LORA_LEAVES = {"lora_up.weight", "lora_down.weight", "lora_up.bias", "alpha", "scale", "dora_scale"}
PEFT_LEAVES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "lora_up.bias": "lora_B.bias",
               "dora_scale": "lora_magnitude_vector"}


def kohya_module_name(path: str, arch: str, ldm_names: bool) -> str:
    """``unet.down_blocks.0.…to_q`` → ``lora_unet_down_blocks_0_…_to_q`` (the flattened name must read back to
    ``path``: a module name kohya's flattening cannot carry is a ``ToolError``). A DiT family (FLUX.1, SD3):
    ``dit_kohya_name``."""
    family = family_of_arch(arch)
    if family.layout is not None or family.denoiser != "unet":  # a DiT family, with or without an original layout
        return dit_kohya_name(path, family)
    component, _, module = path.partition(".")
    sdxl = arch == Arch.SDXL
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
              "text_encoder_2": "lora_te2_"}.get(component)
    if prefix is None or not module:
        raise ToolError(f"layer {path}: not a UNet or text-encoder layer; kohya names cannot carry it")
    name = module
    if component == "unet" and ldm_names:
        name = diffusers_to_ldm(module, ATTN_UP_BLOCKS.get(arch, (1, 2, 3))) or ""
    elif component.startswith("text_encoder") and not module.startswith("text_projection"):
        name = "text_model." + module
    flat = name.replace(".", "_")
    if not name or component_path(component, unflatten(flat)) != path:
        raise ToolError(f"layer {path}: its kohya name {prefix}{flat or '?'} would read back as another module")
    return prefix + flat


def to_kohya(groups: Grouped, arch: str, *, ldm_names: bool | None = None,
             embeddings: dict[str, torch.Tensor] | None = None) -> StateDict:
    """kohya/LyCORIS state dict of ``groups`` (every type); ``ldm_names`` defaults to SDXL's LDM layout."""
    ldm = arch == Arch.SDXL if ldm_names is None else ldm_names
    out: StateDict = {}
    for path, leaves in groups.items():
        name = kohya_module_name(path, arch, ldm)
        for leaf, t in _kohya_leaves(leaves).items():
            out[f"{name}.{leaf}"] = t
    for name, t in (embeddings or {}).items():
        out[f"bundle_emb.{name}" if name.endswith((".clip_l", ".clip_g")) else
            f"bundle_emb.{name}.string_to_param.*"] = t
    return out


def dit_kohya_name(path: str, family: Family) -> str:
    """A DiT family's canonical path → its kohya module name: original-layout transformer modules as kohya writes
    them (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``),
    diffusers-layout ones as OneTrainer does (``lora_transformer_transformer_blocks_0_attn_to_q``: kohya's own names
    cannot hold a lone ``to_q``), text encoders under ``Family.kohya_out`` (CLIP ``lora_te1_text_model_…``, T5
    ``lora_te3_encoder_block_…``). The name must read back to ``path``."""
    from .kohya import splitter

    component, _, module = path.partition(".")
    if component == family.denoiser:  # Qwen-Image's model names under musubi-tuner's lora_unet_ (Family.kohya_out)
        prefix = "lora_unet_" if family.is_original(module) else family.kohya_out.get(component, "lora_transformer_")
    elif component in family.kohya_out:
        prefix = family.kohya_out[component]
        module = module if component in family.plain_te or module.startswith("text_projection") else \
            "text_model." + module
    else:
        raise ToolError(f"layer {path}: not a {family.display} transformer or text-encoder layer; kohya names cannot "
                        "carry it")
    name = prefix + module.replace(".", "_")
    if splitter(family)(name + ".alpha") != (path, "alpha"):
        raise ToolError(f"layer {path}: its kohya name {name} would read back as another module")
    return name


def to_comfy(groups: Grouped, family: Family) -> StateDict:
    """A DiT family's file as ComfyUI (and ai-toolkit, for FLUX.1) write them: ``diffusion_model.<original path>
    .lora_A.weight``, ``lora_B.weight`` (``lora_B.bias``), ``.alpha``, any other type with its LyCORIS leaves; a
    layer kept in the diffusers layout as ``transformer.<path>``; text encoders under ComfyUI's ``text_encoders.``
    names (``Family.comfy_out``)."""
    out: StateDict = {}
    for path, leaves in groups.items():
        component, _, module = path.partition(".")
        prefix = family.comfy_out.get(component)
        if prefix is None:
            raise ToolError(f"layer {path}: not a {family.display} transformer or text-encoder layer")
        if component == family.denoiser and not family.is_original(module):
            prefix = "transformer."
        for leaf, t in _kohya_leaves(leaves).items():
            out[f"{prefix}{module}.{COMFY_LEAVES.get(leaf, leaf)}"] = t
    return out


COMFY_LEAVES = {k: v for k, v in PEFT_LEAVES.items() if k != "dora_scale"}  # a magnitude keeps its own shape


def _kohya_leaves(leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's ``scale`` back to ``alpha``; a per-output DoRA magnitude shaped (out, 1, …) like the weight."""
    out = dict(leaves)
    down = out.get("lora_down.weight")
    if "scale" in out and down is not None and "alpha" not in out:
        out["alpha"] = torch.tensor(float(out.pop("scale")) * down.shape[0], dtype=_float_dtype(down))
    mag = out.get("dora_scale")
    if mag is not None and down is not None and _per_output(mag):
        out["dora_scale"] = mag.reshape(-1, *[1] * (down.dim() - 1))
    return out


def _per_output(mag: torch.Tensor) -> bool:
    return mag.dim() <= 1 or mag.shape[0] != 1 or mag.shape[1] == 1  # the rule of adapters.DoRA


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def to_peft(groups: Grouped, arch: str | None = None) -> tuple[StateDict, dict[str, str]]:
    """PEFT/diffusers tensors and header metadata (``lora_adapter_metadata``, ``format``) of ``groups``."""
    out: StateDict = {}
    per_component: dict[str, dict[str, tuple[int, float, bool]]] = {}
    biased: set[str] = set()
    for path, leaves in groups.items():
        rank, alpha, dora = _peft_layer(path, leaves)
        component, _, module = path.partition(".")
        per_component.setdefault(component, {})[module] = (rank, alpha, dora)
        if "lora_up.bias" in leaves:
            biased.add(component)
        t5 = arch is not None and component in family_of_arch(arch).plain_te  # T5 has no text_model level
        key = f"{component}.{module if t5 else _peft_module(component, module)}"
        for leaf, t in leaves.items():
            if leaf in ("alpha", "scale"):
                continue
            if leaf == "dora_scale":
                conv = leaves["lora_down.weight"].dim() == 4
                t = t.reshape(1, -1, 1, 1) if conv else t.reshape(-1)
            if leaf == "lora_up.weight" and leaves["lora_down.weight"].dim() == 4:
                t = t.reshape(t.shape[0], -1, 1, 1)
            out[f"{key}.{PEFT_LEAVES[leaf]}"] = t
    meta: dict[str, object] = {}
    for component, layers in per_component.items():
        meta.update({f"{component}.{k}": v for k, v in _lora_config(component, layers).items()})
        if component in biased:  # PEFT's ``lora_bias``: the lora_B layers have a bias (BFL control LoRAs)
            meta[f"{component}.lora_bias"] = True
    return out, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}


def _peft_module(component: str, module: str) -> str:
    te = component.startswith("text_encoder") and not module.startswith("text_projection")
    return f"text_model.{module}" if te else module


def peft_problem(path: str, leaves: dict[str, torch.Tensor]) -> str | None:
    """Why PEFT/diffusers files cannot hold this layer, or ``None`` when they can."""
    extra = sorted(set(leaves) - LORA_LEAVES)
    if extra or "lora_down.weight" not in leaves:
        what = "Tucker LoCon (lora_mid)" if "lora_mid.weight" in extra else f"keys {', '.join(extra[:4])}"
        return (f"layer {path}: PEFT/diffusers files hold LoRA/LoCon layers only; this layer has {what} — write it "
                "--to kohya, or turn it into a LoRA with `lorakit resize` / `merge --method svd`")
    mag = leaves.get("dora_scale")
    if mag is not None and not _per_output(mag):
        return f"layer {path}: a per-input DoRA magnitude {tuple(mag.shape)} has no PEFT form (PEFT's DoRA is per output)"
    return None


def _peft_layer(path: str, leaves: dict[str, torch.Tensor]) -> tuple[int, float, bool]:
    """(rank, α, DoRA) of a layer PEFT can express; a ``ToolError`` naming the layer otherwise."""
    problem = peft_problem(path, leaves)
    if problem:
        raise ToolError(problem)
    rank = int(leaves["lora_down.weight"].shape[0])
    if "alpha" in leaves:
        alpha = float(leaves["alpha"])
    elif "scale" in leaves:
        alpha = float(leaves["scale"]) * rank
    else:
        alpha = float(rank)  # no α: scale 1, as kohya and PEFT readers assume
    return rank, alpha, "dora_scale" in leaves


def _lora_config(component: str, layers: dict[str, tuple[int, float, bool]]) -> dict[str, object]:
    """``LoraConfig`` arguments: the most common r and α, patterns for the layers that differ."""
    doras = {d for _, _, d in layers.values()}
    if len(doras) > 1:
        raise ToolError(f"{component}: some layers are DoRA and some are not; one PEFT config cannot say that")
    r = Counter(v[0] for v in layers.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in layers.values()).most_common(1)[0][0]
    # PEFT reads a pattern key as the end of a module path: FLUX.1's top-level ``proj_out`` would also name every
    # ``single_transformer_blocks.N.proj_out`` (the first key that matches wins); ``^proj_out`` is that one only
    suffixes = {m.split(".", i)[-1] for m in layers for i in range(1, m.count(".") + 1)}
    key = {m: f"^{m}" if m in suffixes else m for m in layers}
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {key[m]: v[0] for m, v in sorted(layers.items()) if v[0] != r},
            "alpha_pattern": {key[m]: v[1] for m, v in sorted(layers.items()) if v[1] != alpha},
            "use_dora": doras == {True}, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
            "init_lora_weights": True}


def exact_alphas(groups: Grouped, metadata: dict[str, str]) -> Grouped:
    """PEFT files keep α in the header; the reader turns it into an fp32 ``scale`` = α/r, which loses bits. For
    converting, put the header's α back as ``alpha`` (exact) where a layer's α is a plain ``lora_alpha`` or an
    ``alpha_pattern`` entry; rsLoRA layers (scale α/√r) keep their ``scale``."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        return groups
    if not isinstance(meta, dict):
        return groups
    out: Grouped = {}
    for path, leaves in groups.items():
        alpha = _header_alpha(meta, path)
        if "scale" in leaves and alpha is not None and "lora_down.weight" in leaves:
            leaves = {k: v for k, v in leaves.items() if k != "scale"}
            leaves["alpha"] = torch.tensor(alpha, dtype=_float_dtype(leaves["lora_down.weight"]))
        out[path] = leaves
    return out


def _header_alpha(meta: dict[str, object], path: str) -> float | None:
    component, _, module = path.partition(".")
    if meta.get(f"{component}.use_rslora"):
        return None
    alpha = meta.get(f"{component}.lora_alpha")
    patterns = meta.get(f"{component}.alpha_pattern")
    for pattern, value in (patterns.items() if isinstance(patterns, dict) else []):
        if pattern_matches(pattern, module):
            alpha = value
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
    return float(alpha) if ok else None  # type: ignore[arg-type]
