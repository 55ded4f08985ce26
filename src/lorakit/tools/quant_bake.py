"""What ``bake`` needs for quantized bases (fp8, ComfyUI scaled fp8, GGUF): the stand-in layer is the layer the
loader makes — lorakit's own fp8 layer, diffusers' ``GGUFLinear`` — computing in ``DENSE`` (bf16), so the
``Patcher`` merges per forward exactly as on the loaded base, and the baked weight is read from that merged forward
— ``round_bf16(fp32(dq(Wq)) + ΣΔW)``, the weight ``apply_loras`` computes on the base — never written into the
quantized storage. A GGUF file's dense tensors (F32/F16 norms, biases) stand in cast to ``DENSE``, as the loader
casts them for a base loaded in bf16."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..quant.layers import FP8, Fp8Conv2d, Fp8Linear
from .modelfile import DENSE, Ref

__all__ = ["DENSE", "patched", "quantized_leaf", "stand_in"]


def stand_in(t: torch.Tensor, ref: Ref) -> torch.nn.Parameter:
    """A file tensor as the stand-in model's parameter: GGUF blocks as their ``GGUFParameter`` (a plain
    ``Parameter`` would drop the quantization type), a GGUF file's dense tensors in ``DENSE``, others as stored."""
    from .gguf_modelfile import GgufFile

    if isinstance(t, torch.nn.Parameter):
        return t
    if isinstance(ref.file, GgufFile):  # its F32/F16 tensors: what a base loaded in bf16 holds
        t = t.to(DENSE)
    return torch.nn.Parameter(t, requires_grad=False)


def quantized_leaf(leaf: torch.nn.Module, ref: Ref) -> torch.nn.Module:
    """``leaf`` (a Linear/Conv2d holding the file's fp8 weight or GGUF blocks) as an ``Fp8Linear``/``Fp8Conv2d``
    (with the weight's scale) or a ``GGUFLinear``, computing in bf16; any other leaf as it is."""
    weight = getattr(leaf, "weight", None)
    if not isinstance(weight, torch.Tensor) or not (weight.dtype in FP8 or hasattr(weight, "quant_type")):
        return leaf
    made: torch.nn.Module
    if hasattr(weight, "quant_type") and isinstance(leaf, torch.nn.Linear):
        from diffusers.quantizers.gguf.utils import GGUFLinear

        with torch.device("meta"):
            made = GGUFLinear(leaf.in_features, leaf.out_features, leaf.bias is not None, compute_dtype=DENSE)
    elif isinstance(leaf, torch.nn.Conv2d):
        made = Fp8Conv2d(leaf, DENSE)
    elif isinstance(leaf, torch.nn.Linear):
        with torch.device("meta"):
            made = Fp8Linear(leaf.in_features, leaf.out_features, leaf.bias is not None, DENSE)
    else:
        return leaf
    made.weight = weight
    if leaf.bias is not None:
        made.bias = leaf.bias
    if weight.dtype in FP8:
        setattr(made, "scale", ref.scale_values())
    return made


def patched(leaf: torch.nn.Module, names: Mapping[str, torch.dtype], bias: torch.Tensor | None) \
        -> dict[str, torch.Tensor]:
    """The patched ``weight`` and — where a LoRA changed it from ``bias`` (the stand-in's, before patching) —
    ``bias`` of ``leaf``: a merged forward's (quantized layer; the bias back in its file dtype), else the parameters
    the Patcher wrote. A bias left out is written as stored (a GGUF file's F32 bias stands in as bf16: unchanged, it
    keeps its own bytes)."""
    merged = vars(leaf).get("forward")
    if merged is None:
        out = {n: getattr(leaf, n).data for n in names}
    else:
        out = {"weight": merged.weight()}
        if "bias" in names:
            out["bias"] = merged.bias().to(names["bias"])
    if "bias" in out and bias is not None and torch.equal(out["bias"], bias.to(out["bias"].dtype)):
        del out["bias"]
    return out
