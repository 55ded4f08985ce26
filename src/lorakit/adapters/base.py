"""The one small interface every network type implements.

An adapter holds one layer's tensors (kohya/LyCORIS leaf names, ``keymap.leaves``) and turns them into ΔW for the
original weight. Two checks keep bad files from reaching torch: ``validate`` (at load, without a model: the
tensors agree with each other) and ``shape_error`` (before any weight changes: the tensors fit this weight). Both
read shapes only, so that no tensor larger than the layer's weight is ever made for a file that does not fit it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..errors import InvalidLora
from . import functional as fn

Tensor = torch.Tensor
Shape = Sequence[int]
Pieces = tuple[tuple[int, int], ...]  # row ranges of a fused weight, in the order a target module has them
SCALARS = ("alpha", "scale", "on_input")  # leaves read as one number


class Adapter:
    """One layer of one LoRA. Subclasses set ``kind``, ``detect`` (leaves that identify the type) and ``keys``
    (every leaf they consume) from ``keymap.leaves``, and implement ``validate``, ``shape_error`` and ``delta``."""

    kind: ClassVar[str] = "?"
    detect: ClassVar[tuple[str, ...]] = ()
    keys: ClassVar[tuple[str, ...]] = ()
    changes_bias: ClassVar[bool] = False
    needs_weight: ClassVar[bool] = False  # ΔW depends on W's values, not only its shape
    bypass: ClassVar[bool] = False  # hook_output needs no ΔW (hooks then call it on every forward, uncached)

    def __init__(self, tensors: dict[str, Tensor], where: str) -> None:
        self.t = tensors
        self.where = where
        self._validate_sizes()
        self.validate()

    # -- facts ---------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha(self) -> float | None:
        return self.number("alpha")

    def scale(self) -> float:
        """α/r, or the explicit ``scale`` key; 1 when neither applies."""
        if "scale" in self.t:
            return self.number("scale")  # type: ignore[return-value]
        r, alpha = self.rank, self.alpha
        return 1.0 if alpha is None or not r else alpha / r

    def number(self, key: str) -> float | None:
        """A one-number leaf as a float (``None`` when absent), read from its tensor once: a switch asks for
        α on every layer, and each read of a tensor is a torch op (on a GPU: the host side of a switch)."""
        t = self.t.get(key)
        if t is None:
            return None
        cache: dict[str, tuple[Tensor, float]] = self.__dict__.setdefault("_numbers", {})
        hit = cache.get(key)
        # Checked against the tensor object: shallow copies (placement) share this cache safely, and one given new
        # leaves reads them anew.
        if hit is None or hit[0] is not t:
            hit = cache[key] = (t, float(t))
        return hit[1]

    def leaves(self) -> dict[str, Tensor]:
        """Every tensor this layer reads (a wrapper's and its inner adapter's)."""
        return self.t

    def widths(self) -> tuple[int | None, int | None]:
        """(out, in) of the weight the factors fix, where they show them (``None``: they do not)."""
        return None, None

    def rows_alike(self) -> bool:
        """Whether every row of W changes by the same rule whatever the rows are (IA3 on inputs): then a part of a
        fused layer takes the adapter as it is, and the fused layer's rows need not be known."""
        return False

    def rows(self, pieces: Pieces, where: str) -> "Adapter | None":
        """An adapter of this type whose ΔW is exactly rows ``pieces`` of this one's (a module that is part of a
        fused one: FLUX's ``qkv``), or ``None`` when the type cannot say that by itself (``adapters.rows.Rows``
        then computes the fused change and takes the rows)."""
        return None

    def validate(self) -> None:
        """Raise ``InvalidLora`` when the tensors contradict each other (checked at load, before any model)."""

    def shape_error(self, weight_shape: Shape) -> str | None:
        """A message when this layer cannot apply to a weight of ``weight_shape``; ``None`` when it fits — then
        ``delta`` is guaranteed to work and to make nothing larger than the weight or a factor."""
        return None

    # -- math ----------------------------------------------------------------------------------------------
    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        """ΔW (fp32, ``weight.shape``) at user strength ``strength``; ``weight`` is the fp32 original."""
        raise NotImplementedError

    def bias_delta(self, strength: float) -> Tensor | None:
        return None

    def delta_rows(self, pieces: Pieces, fused_shape: Shape, strength: float, dyn: int | None = None) -> Tensor:
        """Rows ``pieces`` of ΔW for a weight of ``fused_shape`` (types whose ΔW does not read W; LoKr makes only
        the rows it needs)."""
        like = next(iter(self.leaves().values()))
        shape = torch.Size(fused_shape)
        return gather_rows(self.delta(like.new_zeros((), dtype=torch.float32).expand(shape), strength, dyn), pieces)

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

    def get(self, key: str) -> Tensor:
        """A leaf that ``validate`` made sure of, in fp32."""
        return self.t[key].float()

    def fail(self, problem: str) -> InvalidLora:
        return InvalidLora(None, f"layer {self.where}: {problem}")

    def need(self, *keys: str) -> None:
        missing = [k for k in keys if k not in self.t]
        if missing:
            raise self.fail(f"{self.kind} layer lacks {', '.join(missing)} (has {', '.join(sorted(self.t))})")

    def dims(self, key: str, *allowed: int, what: str = "") -> Tensor:
        """``self.t[key]``, which must have one of the ``allowed`` numbers of dimensions."""
        t = self.t[key]
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-d" for n in allowed)
            raise self.fail(f"{key} must be {what or want}, got shape {tuple(t.shape)}")
        return t

    def _validate_sizes(self) -> None:
        """Scalars hold one number; every other tensor has at least one value (a zero-size axis, e.g. rank 0,
        makes nothing to apply)."""
        for key, t in self.t.items():
            if key in SCALARS and t.numel() != 1:
                raise self.fail(f"{key} must be a single number, got shape {tuple(t.shape)}")
            if t.numel() == 0:
                raise self.fail(f"{key} has no values (shape {tuple(t.shape)})")


class Wrapper(Adapter):
    """An adapter around another (``inner``): DoRA, the rows of a fused layer. Rank, α, type name and leaves are
    the inner adapter's."""

    inner: Adapter

    @property
    def inner_kind(self) -> str:
        return str(getattr(self.inner, "kind_name", self.inner.kind))

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    def leaves(self) -> dict[str, Tensor]:
        return {**self.inner.leaves(), **self.t}


def gather_rows(t: Tensor, pieces: Pieces) -> Tensor:
    """Rows ``pieces`` of ``t``, in order (a view for one piece)."""
    if len(pieces) == 1:
        return t[pieces[0][0]:pieces[0][1]]
    return torch.cat([t[a:b] for a, b in pieces])


def numel(shape: Shape) -> int:
    return math.prod(shape)


def trailing_ones(t: Tensor) -> bool:
    """``(a, b)`` or ``(a, b, 1, …)``: a factor that a 1×1 convolution or a Linear would hold."""
    return t.dim() >= 2 and all(s == 1 for s in t.shape[2:])


def same_kernel(got: Shape, want: Shape) -> bool:
    """Kernel axes agree: equal, or both 1×1 / none (a Linear's (out, in) and a 1×1 conv's (out, in, 1, 1))."""
    return tuple(got) == tuple(want) or numel(got) == numel(want) == 1


def fits_columns(tail: Shape, weight_shape: Shape) -> bool:
    """A factor's trailing axes ``tail`` (after its rank axis) give W's columns ``(in, k…)``: the same axes, or one
    flattened axis of in·k·k values (row-major, as LyCORIS stores LoHa and flattened LoKr factors)."""
    want = tuple(weight_shape[1:])
    if len(tail) == 1:
        return tail[0] == numel(want)
    return tail[0] == want[0] and same_kernel(tuple(tail[1:]), want[1:])


def weight_kind_error(kind: str, weight_shape: Shape) -> str | None:
    """Linear/Conv2d weights only: the types below act on (out, in[, kh, kw]) matrices."""
    if len(weight_shape) in (2, 4):
        return None
    return f"{kind} applies to Linear and Conv2d weights, this one is {tuple(weight_shape)}"
