"""What ``bake`` needs for quantized (fp8, ComfyUI scaled fp8) bases: the stand-in layer is lorakit's own fp8 layer,
so the ``Patcher`` merges per forward exactly as on the loaded base, and the baked weight is read from that merged
forward — ``round_bf16(fp32(dq(Wq)) + ΣΔW)``, the weight ``apply_loras`` computes on the base — never written into
the fp8 storage."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..quant.layers import FP8, Fp8Conv2d, Fp8Linear
from .modelfile import Ref

DENSE = torch.bfloat16  # a changed layer of a quantized base is written in this dtype (its compute dtype here)


def quantized_leaf(leaf: torch.nn.Module, ref: Ref) -> torch.nn.Module:
    """``leaf`` (a Linear/Conv2d holding the file's fp8 weight) as an ``Fp8Linear``/``Fp8Conv2d`` computing in bf16,
    with the weight's scale; any other leaf as it is."""
    weight = getattr(leaf, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FP8:
        return leaf
    made: torch.nn.Module
    if isinstance(leaf, torch.nn.Conv2d):
        made = Fp8Conv2d(leaf, DENSE)
    elif isinstance(leaf, torch.nn.Linear):
        with torch.device("meta"):
            made = Fp8Linear(leaf.in_features, leaf.out_features, leaf.bias is not None, DENSE)
    else:
        return leaf
    made.weight = weight
    if leaf.bias is not None:
        made.bias = leaf.bias
    setattr(made, "scale", ref.scale_values())
    return made


def patched(leaf: torch.nn.Module, names: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The patched ``weight``/``bias`` of ``leaf``: a merged forward's (quantized layer; the bias back in its file
    dtype), else the parameters the Patcher wrote."""
    merged = vars(leaf).get("forward")
    if merged is None:
        return {n: getattr(leaf, n).data for n in names}
    out = {"weight": merged.weight()}
    if "bias" in names:
        out["bias"] = merged.bias().to(names["bias"])
    return out
