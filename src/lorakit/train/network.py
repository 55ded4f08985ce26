"""The trainable network: kohya/LyCORIS leaves as fp32 parameters, one adapter per target layer, and a training
forward that is **the inference math itself** — the adapters of ``adapters/`` built on the live parameters, run by
the hooks of ``patch/hooks.py`` (uncached, so every forward sees the current values).

Which layers (kohya's reach): ``lora`` — every Linear and 1×1 convolution inside the UNet's transformer blocks,
and the text encoders' attention and MLP Linears; ``locon``, ``loha``, ``lokr``, ``dora`` — those plus the ResNet
blocks and down/up-samplers (3×3 convolutions at ``conv_rank``/``conv_alpha``).

Initial values make ΔW = 0 (kohya/LyCORIS): LoRA down Kaiming-uniform and up zero; LoHa w1a N(0, 0.1), w1b/w2b
N(0, 1), w2a zero; LoKr w1 and w2_a Kaiming, w2_b (or w2) zero; DoRA's magnitude the weight's per-output norm
(PEFT's and LyCORIS' convention since 2024: ``dora_scale`` (out, 1, …)). Random numbers come from a CPU generator,
so a seed gives the same start on every device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import Adapter, build_adapter
from ..errors import TrainingError
from ..formats.base import Grouped
from ..lora_model import LoraModel
from ..patch.hooks import _LayerHook
from ..patch.plan import Contribution
from ..quant.layers import weight_values

NETWORKS = ("lora", "locon", "loha", "lokr", "dora")
TRANSFORMER_PARENTS = ("Transformer2DModel",)
CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_PARENTS = ("Attention", "MLP")  # CLIPAttention / CLIPSdpaAttention / CLIPMLP


@dataclass(frozen=True)
class NetworkSpec:
    kind: str = "lora"
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int | None = None  # None: ``rank`` (LoCon and the LyCORIS types); 0 leaves 3×3 convolutions out
    conv_alpha: float | None = None  # None: ``alpha``
    train: str = "both"  # unet | te | both
    only: tuple[str, ...] = ()  # keep only layers whose path ends with one of these (e.g. "to_q", "to_out.0")
    t5: bool = False  # FLUX.1: train T5 too with --train te|both (kohya's train_t5xxl)

    def check(self) -> None:
        if self.kind not in NETWORKS:
            raise TrainingError(f"--network must be one of {', '.join(NETWORKS)}, got {self.kind!r}")
        if self.train not in ("unet", "te", "both"):
            raise TrainingError(f"--train must be unet, te or both, got {self.train!r}")
        if not 1 <= self.rank <= 1024 or (self.conv_rank is not None and not 0 <= self.conv_rank <= 1024):
            raise TrainingError(f"--rank must be 1…1024 and --conv-rank 0…1024, got {self.rank}, {self.conv_rank}")
        for name, v in (("--alpha", self.alpha), ("--conv-alpha", self.conv_alpha)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise TrainingError(f"{name} must be a positive number, got {v}")

    def for_layer(self, module: torch.nn.Module) -> tuple[int, float]:
        """(rank, alpha) of one layer: 3×3 convolutions get the conv values."""
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
            r = self.rank if self.conv_rank is None else self.conv_rank
            return r, self.alpha if self.conv_alpha is None else self.conv_alpha
        return self.rank, self.alpha

    def args(self) -> dict[str, str]:
        """kohya's ``ss_network_args``."""
        out = {"algo": self.kind}
        if self.only:
            out["only_layers"] = ",".join(self.only)
        if self.t5:
            out["train_t5xxl"] = "True"
        if self.kind != "lora":
            out.update(conv_dim=str(self.rank if self.conv_rank is None else self.conv_rank),
                       conv_alpha=f"{self.alpha if self.conv_alpha is None else self.conv_alpha:g}")
        return out


def target_modules(components: dict[str, torch.nn.Module], spec: NetworkSpec) -> dict[str, torch.nn.Module]:
    """Canonical path → module, in the model's own order."""
    out: dict[str, torch.nn.Module] = {}
    wanted = {"unet": spec.train in ("unet", "both"), "te": spec.train in ("te", "both")}
    for component, root in components.items():
        is_te = component.startswith("text_encoder")
        if not wanted["te" if is_te else "unet"]:
            continue
        parents = TE_PARENTS if is_te else TRANSFORMER_PARENTS + (CONV_PARENTS if spec.kind != "lora" else ())
        for path, module in _children_of(root, parents, suffix=is_te):
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
                if spec.kind == "lora" or spec.for_layer(module)[0] == 0:
                    continue
            elif not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            canonical = path.removeprefix("text_model.") if is_te else path
            if spec.only and not any(canonical.endswith("." + o) or canonical == o for o in spec.only):
                continue
            out[f"{component}.{canonical}"] = module
    if not out:
        only = f" and --only-layers {','.join(spec.only)}" if spec.only else ""
        raise TrainingError(f"no layer of the model can take a {spec.kind} network with --train {spec.train}{only}")
    return out


def _children_of(root: torch.nn.Module, parents: tuple[str, ...], suffix: bool) -> list[tuple[str, torch.nn.Module]]:
    """Modules below a module whose class name is (``suffix``: ends with) one of ``parents``."""
    inside: list[str] = []
    out = []
    for path, module in root.named_modules():
        name = type(module).__name__
        if any(name.endswith(p) if suffix else name == p for p in parents):
            inside.append(path + ".")
        elif any(path.startswith(p) for p in inside):
            out.append((path, module))
    return out


class Network:
    """The trainable leaves of every target layer, and the adapters made of them."""

    def __init__(self, modules: dict[str, torch.nn.Module], spec: NetworkSpec, seed: int) -> None:
        spec.check()
        self.spec = spec
        self.modules = modules
        gen = torch.Generator().manual_seed(seed)
        self.leaves: dict[str, dict[str, torch.Tensor]] = {}
        for path, module in modules.items():
            w = module.weight
            if not isinstance(w, torch.Tensor):
                raise TrainingError(f"{path}: the layer has no weight")
            rank, alpha = spec.for_layer(module)
            # W as numbers: a quantized layer's dequantized weight (its stored bytes are not its shape nor values)
            leaves = init_leaves(spec.kind, weight_values(module), rank, alpha, gen)
            self.leaves[path] = {k: _param(v, w.device) for k, v in leaves.items()}
        self._hooks: list[_LayerHook] = []

    def parameters(self) -> list[torch.nn.Parameter]:
        return [t for leaves in self.leaves.values() for t in leaves.values() if isinstance(t, torch.nn.Parameter)]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{p}/{k}": t for p, leaves in self.leaves.items() for k, t in leaves.items()}

    def adapters(self) -> dict[str, Adapter]:
        """One adapter per layer over the live parameters (``build_adapter``: the same classes inference uses)."""
        out = {}
        for path, leaves in self.leaves.items():
            adapter, rest = build_adapter(dict(leaves), path)
            if adapter is None or rest:
                raise TrainingError(f"{path}: internal error, leaves {sorted(leaves)} make no adapter")
            out[path] = adapter
        return out

    def attach(self) -> None:
        """Training forward: each target layer's output gets its adapter's change (``patch.hooks``, uncached)."""
        self.detach()
        for path, adapter in self.adapters().items():
            self._hooks.append(_LayerHook(self.modules[path], [Contribution(adapter, 1.0, None)], cached=False))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.handle.remove()
        self._hooks = []

    def groups(self, dtype: torch.dtype) -> Grouped:
        """The canonical groups to write (detached copies on the CPU in ``dtype``; ``alpha`` as a 0-d tensor)."""
        return {p: {k: t.detach().to("cpu", dtype).clone() for k, t in leaves.items()}
                for p, leaves in self.leaves.items()}

    def lora_model(self, name: str, arch: str) -> LoraModel:
        return LoraModel(name, None, "kohya", arch, self.adapters())


def _param(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device=device, dtype=torch.float32)
    return t if t.dim() == 0 else torch.nn.Parameter(t)


def init_leaves(kind: str, w: torch.Tensor, rank: int, alpha: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Initial leaves (fp32, CPU) of one layer with weight ``w`` (out, in[, kh, kw])."""
    out_f, in_f, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    k = math.prod(kernel) if kernel else 1
    rank = max(1, min(rank, out_f, in_f * k))
    a = torch.tensor(float(alpha))
    if kind in ("lora", "locon", "dora"):
        down = _kaiming((rank, in_f, *kernel), gen)
        up = torch.zeros((out_f, rank, *[1] * len(kernel)))
        leaves = {"lora_down.weight": down, "lora_up.weight": up, "alpha": a}
        if kind == "dora":
            norm = w.float().flatten(1).norm(dim=1).cpu()
            leaves["dora_scale"] = norm.reshape(out_f, *[1] * (w.dim() - 1))
        return leaves
    if kind == "loha":
        return {"hada_w1_a": torch.randn((out_f, rank), generator=gen) * 0.1,
                "hada_w1_b": torch.randn((rank, in_f * k), generator=gen),
                "hada_w2_a": torch.zeros((out_f, rank)),
                "hada_w2_b": torch.randn((rank, in_f * k), generator=gen), "alpha": a}
    if kind == "lokr":
        o1, o2 = factorize(out_f)
        i1, i2 = factorize(in_f)
        leaves = {"lokr_w1": _kaiming((o1, i1), gen)}
        cols = i2 * k
        if rank < max(o2, cols) / 2:  # LyCORIS: decompose W2 when that is smaller
            leaves.update({"lokr_w2_a": _kaiming((o2, rank), gen), "lokr_w2_b": torch.zeros((rank, cols)),
                           "alpha": a})
        else:
            leaves["lokr_w2"] = torch.zeros((o2, i2, *kernel))
        return leaves
    raise TrainingError(f"unknown network type {kind!r}")


def _kaiming(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """``kaiming_uniform_(a=√5)`` (torch's Linear/Conv default, kohya's lora_down) from ``gen``."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(fan_in)  # gain √(2/(1+5)) · √(3/fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def factorize(n: int) -> tuple[int, int]:
    """n = a·b with a ≤ b as close as possible (LyCORIS' ``factorization(n, -1)``)."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a
