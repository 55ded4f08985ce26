"""The trainable network of a FLUX.1 model, as kohya's ``networks/lora_flux.py`` makes it: **one** network per BFL
module — a double block's fused ``img_attn.qkv``/``txt_attn.qkv`` and a single block's ``linear1`` (q|k|v|mlp)
included — on a diffusers ``FluxTransformer2DModel``, which keeps those parts apart.

A fused layer's leaves are made at the fused shape (rows = the sum of its parts', e.g. 3·h for ``qkv``) and named
by the BFL module (``transformer.double_blocks.0.img_attn.qkv``), so the file is kohya's FLUX layout. The training
forward runs them as inference does: ``layout.build_layers`` — the code that loads such a file — splits each fused
adapter into its parts (``adapters.rows.split_rows``: LoRA's parts share the ``down`` Parameter and take row views of
``up``; LoKr's part is rows of the fused change, ``Rows``; LoHa and per-output DoRA take their factors' rows), and
each part runs on its diffusers module through the hooks of ``patch/hooks.py``. Every part is a view or function of
the fused leaves, so the gradients of all parts reach the one set of leaves.

Reach (kohya's default): every Linear of the double blocks (``img_mod.lin``, ``img_attn.qkv``, ``img_attn.proj``,
``img_mlp.0``, ``img_mlp.2`` and the ``txt_`` ones) and of the single blocks (``linear1``, ``linear2``,
``modulation.lin``); the embedders and the final layer only when ``--only-layers`` names them (kohya's ``in_dims``).
Text encoders (``--train te|both``): CLIP-L's attention and MLP Linears (kohya trains CLIP-L unless
``--network_train_unet_only``); T5 only with ``t5`` (kohya's ``train_t5xxl=True``; off by default).
"""
from __future__ import annotations

from typing import Any

import torch

from ..adapters import Adapter
from ..errors import TrainingError
from ..keymap.families import FLUX1, Family
from ..layout import build_layers
from ..quant.layers import compute_dtype, is_quantized, weight_shape, weight_values
from .network import Network, NetworkSpec, _children_of, _param, init_leaves

DOUBLE = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
          "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE = ("linear1", "linear2", "modulation.lin")
ON_REQUEST = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
              "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
              "final_layer.adaLN_modulation.1")
CLIP_PARENTS = ("Attention", "MLP")  # CLIPAttention / CLIPSdpaAttention / CLIPMLP
T5_PARENTS = ("Attention", "DenseGatedActDense", "DenseReluDense")  # kohya's T5Attention, T5DenseGatedActDense

Target = tuple[torch.Tensor, dict[str, torch.nn.Module]]  # (the layer's weight, fused where it is; its modules)


def bfl_modules(transformer: Any, only: tuple[str, ...], family: Family = FLUX1,
                on_request: tuple[str, ...] = ON_REQUEST) -> list[str]:
    """The BFL module paths to train that this model has, in kohya's order (double blocks, single blocks, then
    the ``on_request`` embedders: only when ``--only-layers`` names them). Chroma's pruned modulations and
    schnell's missing ``guidance_in`` are not in the model, so not trained."""
    paths = [f"double_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks)) for m in DOUBLE]
    paths += [f"single_blocks.{j}.{m}" for j in range(len(transformer.single_transformer_blocks)) for m in SINGLE]
    return present_modules(transformer, family, paths + (list(on_request) if only else []), only)


def present_modules(transformer: Any, family: Family, paths: list[str], only: tuple[str, ...]) -> list[str]:
    """Those of ``paths`` (original-layout modules, or the model's own names where the family has no original
    layout) whose every model module exists and that ``--only-layers`` keeps, in order."""
    names = dict(transformer.named_modules())
    out = []
    for path in paths:
        target = family.to_model(path) if family.to_model is not None else path
        parts = [target] if isinstance(target, str) else list(target.targets) if target is not None else []
        if parts and all(p in names for p in parts) and _kept(f"{family.denoiser}.{path}", only):
            out.append(path)
    return out


def _kept(path: str, only: tuple[str, ...]) -> bool:
    return not only or any(path.endswith("." + o) or path == o for o in only)


def fused_target(transformer: Any, bfl: str, values: bool, family: Family = FLUX1) -> Target:
    """The weight of a BFL module rebuilt from its diffusers modules (rows where BFL has them: ``qkv`` stacked,
    the final adaLN's halves swapped; ``values=False``: only its shape, as a zero-size expanded tensor), and those
    modules by their canonical paths."""
    mapped = family.to_model(bfl) if family.to_model is not None else bfl  # Qwen-Image: the model's own names
    if mapped is None:
        raise TrainingError(f"internal error: {bfl} is not a {family.display} module")
    if isinstance(mapped, str):
        module = transformer.get_submodule(mapped)
        return _weight(module), {f"{family.denoiser}.{mapped}": module}
    modules = {t: transformer.get_submodule(t) for t in mapped.targets}
    rows = sum(int(m.weight.shape[0]) for m in modules.values())
    hidden = int(transformer.config.num_attention_heads) * int(transformer.config.attention_head_dim)
    pieces = mapped.pieces(rows, hidden)
    if isinstance(pieces, str):
        raise TrainingError(f"{bfl}: the model's modules {', '.join(mapped.targets)} do not make it: {pieces}")
    first = next(iter(modules.values()))
    shape = weight_shape(first) or ()  # a GGUF layer's weight holds bytes: its logical (out, in)
    if not values:
        stored = first.weight
        dtype = compute_dtype(first) if is_quantized(first) else stored.dtype
        return torch.zeros((), dtype=dtype, device=stored.device).expand(rows, *shape[1:]), _named(modules, family)
    parts = {name: _weight(m) for name, m in modules.items()}
    w0 = parts[next(iter(parts))]
    fused = torch.empty((rows, *shape[1:]), dtype=w0.dtype, device=w0.device)
    for part, ranges in pieces:
        w, start = parts[part], 0
        for a, b in ranges:
            fused[a:b] = w[start:start + b - a]
            start += b - a
    return fused, _named(modules, family)


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as numbers (a quantized layer's dequantized: ``quant.layers.weight_values``)."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise TrainingError(f"{type(module).__name__} has no weight")
    return weight_values(module)


def _named(modules: dict[str, torch.nn.Module], family: Family) -> dict[str, torch.nn.Module]:
    return {f"{family.denoiser}.{t}": m for t, m in modules.items()}


def text_targets(pipe: Any, spec: NetworkSpec, t5: bool, clips: tuple[str, ...] = ("text_encoder",),
                 t5_name: str = "text_encoder_2") -> dict[str, torch.nn.Module]:
    """Canonical path → Linear of the CLIP encoders (FLUX.1: CLIP-L; SD3: CLIP-L and CLIP-G) and of T5 (with
    ``t5``) that the network trains."""
    if spec.train not in ("te", "both"):
        return {}
    encoders = [(c, CLIP_PARENTS) for c in clips] + ([(t5_name, T5_PARENTS)] if t5 else [])
    out: dict[str, torch.nn.Module] = {}
    for name, parents in encoders:
        root = getattr(pipe, name, None)
        if root is None:
            raise TrainingError(f"--train {spec.train}: the model has no {name.replace('_', ' ')} to train")
        for path, module in _children_of(root, parents, suffix=True):
            canonical = f"{name}.{path.removeprefix('text_model.')}"
            if isinstance(module, torch.nn.Linear) and _kept(canonical, spec.only):
                out[canonical] = module
    return out


class FluxNetwork(Network):
    """``leaves``: per trained layer as the file names it (original-layout modules, text-encoder Linears);
    ``modules``: the model modules the hooks run on (a fused layer's parts). ``family``/``originals``/``texts``:
    another DiT family's (SD3: ``sd3_network``) — its original modules and its text encoders' Linears."""

    family: Family = FLUX1

    def __init__(self, pipe: Any, spec: NetworkSpec, seed: int, t5: bool = False,
                 originals: list[str] | None = None, texts: dict[str, torch.nn.Module] | None = None) -> None:
        spec.check()
        family = self.family
        if spec.kind == "locon" or spec.conv_rank is not None or spec.conv_alpha is not None:
            raise TrainingError(f"{family.display} has no convolutions to train: --network locon and "
                                "--conv-rank/--conv-alpha do not apply (use --network lora)")
        self.spec = spec
        gen = torch.Generator().manual_seed(seed)
        targets: dict[str, Target] = {}
        if spec.train in ("unet", "both"):
            for bfl in (bfl_modules(pipe.transformer, spec.only) if originals is None else originals):
                targets[f"{family.denoiser}.{bfl}"] = fused_target(pipe.transformer, bfl, spec.kind == "dora", family)
        for path, module in (text_targets(pipe, spec, t5) if texts is None else texts).items():
            targets[path] = (_weight(module), {path: module})
        if not targets:
            only = f" and --only-layers {','.join(spec.only)}" if spec.only else ""
            raise TrainingError(f"no layer of the {family.display} model can take a {spec.kind} network with "
                                f"--train {spec.train}{only}")
        self.leaves: dict[str, dict[str, torch.Tensor]] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        for path, (weight, modules) in targets.items():
            leaves = init_leaves(spec.kind, weight, spec.rank, spec.alpha, gen)
            self.leaves[path] = {k: _param(v, weight.device) for k, v in leaves.items()}
            self.modules.update(modules)
        self._hooks = []

    def adapters(self) -> dict[str, Adapter]:
        """Model module path → adapter over the live parameters: the fused layers split as a loaded file is."""
        layers, rest = build_layers(self.leaves, self.family, None)
        if rest or set(layers) != set(self.modules):
            raise TrainingError(f"internal error: the network's layers {sorted(set(layers) ^ set(self.modules))[:4]} "
                                f"and leaves {rest[:4]} do not match the model's modules")
        return layers
