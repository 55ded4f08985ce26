"""Layer helpers shared by the tools: a layer's weight shape, the dense ΔW of its contributions, and LoRA leaves
written back in the weight's layout.

A contribution is (adapter, strength, dyn): the layer's ΔW is Σ strength·ΔW_adapter — for the types whose ΔW
depends on the weight (DoRA, OFT/BOFT, IA3, GLoRA) ``adapter.delta(W, strength)`` at the base model's W, which
is exactly what fused patching adds (each contribution from the original W, summed in fp32).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..adapters import Adapter, LoKr, Rows, kind_of
from ..adapters import functional as fn
from ..errors import ToolError
from ..keymap.arch import Arch
from ..patch.placement import adapter_on

Tensor = torch.Tensor
LOW_RANK_KINDS = ("lora", "locon", "locon-tucker")
_META_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


@dataclass(frozen=True)
class Contribution:
    adapter: Adapter
    strength: float
    dyn: int | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        return kind_of(self.adapter)


def arch_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Canonical module path → weight shape of the full-size model of ``arch`` (built on the meta device)."""
    if arch not in (Arch.SD1, Arch.SD2, Arch.SDXL):
        return {}
    if arch not in _META_SHAPES:
        from ..models.configs import build_components

        shapes: dict[str, tuple[int, ...]] = {}
        for component, root in build_components(arch).items():
            for name, p in root.named_parameters():
                if name.endswith(".weight"):
                    shapes[f"{component}.{name[:-len('.weight')].removeprefix('text_model.')}"] = tuple(p.shape)
        _META_SHAPES[arch] = shapes
    return _META_SHAPES[arch]


def adapter_shape(adapter: Adapter) -> tuple[int, ...] | None:
    """The weight shape an adapter's own tensors fix, when they do (LoRA/LoCon, full diff, LoKr, Tucker LoHa)."""
    if isinstance(adapter, Rows):  # some rows of a fused layer: the fused shape's columns
        fused = adapter_shape(adapter.inner)
        return None if fused is None else (adapter.out_rows, *fused[1:])
    inner = getattr(adapter, "inner", adapter)
    t = inner.t
    if "lora_down.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        kernel = tuple(t["lora_mid.weight"].shape[2:]) if "lora_mid.weight" in t else tuple(down.shape[2:])
        return (up.shape[0], down.shape[1] if down.dim() > 1 else 1, *kernel)
    if "diff" in t:
        return tuple(t["diff"].shape)
    if "hada_t1" in t:
        return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
    if isinstance(inner, LoKr):
        w1, w2 = inner._factors()
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
        return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    return None


def _loha_flat(adapter: Adapter) -> tuple[int, int] | None:
    t = getattr(adapter, "inner", adapter).t
    if "hada_w1_a" not in t:
        return None
    return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].reshape(t["hada_w1_b"].shape[0], -1).shape[1])


def check_same_shape(path: str, contribs: Sequence[Contribution], fused: str | None = None) -> None:
    """The contributions to one layer must be for the same weight: their factors' flat (out, in·kh·kw) agree where
    they fix it; else a ``ToolError`` naming both sources (LoRAs of different models, one of an unknown base).
    ``fused``: the fused layer ``path`` is some rows of (FLUX.1's ``qkv``), which the error names instead."""
    known = [(c, d) for c in contribs if (d := _flat_dims(c.adapter)) is not None]
    for c, dims in known[1:]:
        if dims != known[0][1]:
            first, d0 = known[0]
            if fused is not None:
                sources = ", ".join(sorted({k.source for k in contribs}))
                raise ToolError(f"layer {fused}: the inputs ({sources}) give its parts different shapes: LoRAs for "
                                "different models")
            raise ToolError(f"layer {path}: {first.source or 'one input'} is for a {d0[0]}×{d0[1]} weight, "
                            f"{c.source or 'another'} for a {dims[0]}×{dims[1]} one: the LoRAs are for different "
                            "models")


def _flat_dims(adapter: Adapter) -> tuple[int, int] | None:
    shape = adapter_shape(adapter)
    return flat(shape) if shape is not None else _loha_flat(adapter)


def _by_name(path: str, out: int, n: int) -> tuple[int, ...]:
    """A LoHa's flat (out, in·kh·kw): in every SD UNet the 3×3 convolutions are exactly the resnets' ``conv1``/
    ``conv2``, the samplers' ``conv`` and ``conv_in``/``conv_out``; every other layer is a Linear or a 1×1
    convolution, which a 2-D factor fits."""
    last = path.rsplit(".", 1)[-1]
    if path.startswith("unet.") and last in ("conv1", "conv2", "conv", "conv_in", "conv_out") and n % 9 == 0:
        return (out, n // 9, 3, 3)
    return (out, n)


def layer_shape(path: str, contribs: Sequence[Contribution], base: Callable[[str], tuple[int, ...] | None] | None,
                arch: str) -> tuple[int, ...]:
    """The weight shape of ``path``: the base model's, else one an adapter's factors fix, else the full-size
    model's of ``arch`` where it agrees with a LoHa's flat factors, else the SD UNet naming rule."""
    shape = base(path) if base is not None else None
    for c in contribs:
        shape = shape or adapter_shape(c.adapter)
    flat_dims = next((d for c in contribs if (d := _loha_flat(c.adapter))), None)
    guess = arch_shapes(arch).get(path)
    if shape is None and guess is not None and flat_dims == flat(guess):
        shape = guess
    if shape is None and flat_dims is not None:
        shape = _by_name(path, *flat_dims)
    if shape is None:
        kinds = ", ".join(sorted({c.kind for c in contribs}))
        raise ToolError(f"layer {path}: the weight's shape is not in the {kinds} factors; give the base model "
                        "(--base MODEL) so it can be read")
    return shape


def dense_delta(path: str, contribs: Sequence[Contribution], shape: tuple[int, ...], weight: Tensor | None,
                device: torch.device) -> Tensor:
    """Σ strength·ΔW (fp32, ``shape``) on ``device``; ``weight`` (fp32) for the types that need it (the others
    read only W's shape and get zeros)."""
    needy = sorted({c.kind for c in contribs if c.adapter.needs_weight})
    if needy and weight is None:
        raise ToolError(f"layer {path}: the ΔW of a {', '.join(needy)} layer depends on the base weight; give the "
                        "base model (--base MODEL) and it is computed at the given strength")
    w = weight.to(device) if weight is not None else torch.zeros(shape, dtype=torch.float32, device=device)
    acc = torch.zeros(shape, dtype=torch.float32, device=device)
    for c in contribs:
        adapter = c.adapter if device.type == "cpu" else adapter_on(c.adapter, device)
        acc.add_(adapter.delta(w, c.strength, c.dyn))
    return acc


def lora_leaves(up: Tensor, down: Tensor, alpha: float, shape: tuple[int, ...]) -> dict[str, Tensor]:
    """kohya LoRA/LoCon leaves for flat factors up (out, k), down (k, n) of a weight ``shape``:
    conv weights get ``up`` (out, k, 1, 1) and ``down`` (k, in, kh, kw)."""
    k = up.shape[1]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    return {"lora_up.weight": up.contiguous(), "lora_down.weight": down.contiguous(),
            "alpha": torch.tensor(float(alpha), dtype=up.dtype)}


def flat(shape: tuple[int, ...]) -> tuple[int, int]:
    n = 1
    for s in shape[1:]:
        n *= s
    return shape[0], n


def is_conv_kernel(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


def tucker_delta(up: Tensor, down: Tensor, mid: Tensor, shape: tuple[int, ...]) -> Tensor:
    return fn.lora_delta(up, down, mid, 1.0, torch.Size(shape))


def leaves_of(adapter: Adapter) -> dict[str, Tensor]:
    """A layer's leaves as read: a wrapper's (DoRA's magnitude) beside its inner adapter's tensors."""
    inner = getattr(adapter, "inner", None)
    return {**(leaves_of(inner) if isinstance(inner, Adapter) else {}), **adapter.t}
