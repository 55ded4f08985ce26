"""The one small interface every network type implements, and the registry that picks one for a layer.

An adapter holds one layer's tensors (kohya/LyCORIS leaf names) and turns them into ΔW for the original weight.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import InvalidLora
from . import functional as fn

Tensor = torch.Tensor


class Adapter:
    """One layer of one LoRA. Subclasses set ``kind``, ``detect`` (keys that identify the type) and ``keys``
    (every leaf they consume), and implement ``delta``."""

    kind: ClassVar[str] = "?"
    detect: ClassVar[tuple[str, ...]] = ()
    keys: ClassVar[tuple[str, ...]] = ()
    changes_bias: ClassVar[bool] = False
    needs_weight: ClassVar[bool] = False  # ΔW depends on W's values, not only its shape

    def __init__(self, tensors: dict[str, Tensor], where: str) -> None:
        self.t = tensors
        self.where = where
        self.validate()

    # -- facts ---------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha(self) -> float | None:
        a = self.t.get("alpha")
        return None if a is None else float(a)

    def scale(self) -> float:
        """α/r, or the explicit ``scale`` key; 1 when neither applies."""
        if "scale" in self.t:
            return float(self.t["scale"])
        r = self.rank
        return 1.0 if self.alpha is None or not r else self.alpha / r

    def validate(self) -> None:
        """Raise ``InvalidLora`` when the tensors contradict each other (checked at load, before any model)."""

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        """A message when this layer cannot apply to a weight of ``weight_shape``; ``None`` when it fits."""
        return None

    # -- math ----------------------------------------------------------------------------------------------
    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        """ΔW (fp32, ``weight.shape``) at user strength ``strength``; ``weight`` is the fp32 original."""
        raise NotImplementedError

    def bias_delta(self, strength: float) -> Tensor | None:
        return None

    def add_into(self, acc: Tensor, weight: Tensor, strength: float, dyn: int | None = None) -> None:
        """acc += ΔW(strength); ``acc`` fp32 with ``weight``'s shape. Subclasses may avoid the temporary."""
        acc.add_(self.delta(weight, strength, dyn))

    def write_sum(self, out: Tensor, weight: Tensor, strength: float, dyn: int | None = None) -> bool:
        """Write ``weight + ΔW(strength)`` into ``out`` in one pass when the type can (fp32 only); ``False``
        means the caller copies ``weight`` and uses ``add_into``."""
        return False

    def low_rank(self, dyn: int | None = None) -> tuple[Tensor, Tensor, float] | None:
        """``(up (out, r), down (r, in·k·k), scale)`` fp32 when ΔW = scale·up@down (lets weights be patched in
        cache-sized row blocks); ``None`` for other types."""
        return None

    def hook_output(self, module: torch.nn.Module, x: Tensor, weight: Tensor, strength: float,
                    dyn: int | None = None) -> Tensor:
        """The change of ``module``'s output for input ``x`` (hooks mode); equals using W + ΔW."""
        d = self.delta(weight, strength, dyn).to(x.dtype)
        b = self.bias_delta(strength)
        return fn.module_op(module, x, d, None if b is None else b.to(x.dtype))

    # -- helpers -------------------------------------------------------------------------------------------
    def f32(self, key: str) -> Tensor | None:
        v = self.t.get(key)
        return None if v is None else v.float()

    def fail(self, problem: str) -> InvalidLora:
        return InvalidLora(None, f"layer {self.where}: {problem}")

    def need(self, *keys: str) -> None:
        missing = [k for k in keys if k not in self.t]
        if missing:
            raise self.fail(f"{self.kind} layer lacks {', '.join(missing)} (has {', '.join(sorted(self.t))})")


def numel_error(kind: str, got: int, shape: torch.Size) -> str | None:
    want = 1
    for s in shape:
        want *= s
    return None if got == want else f"{kind} makes {got} values, the weight {tuple(shape)} has {want}"
