"""GLoRA: ΔW = s·(W·A1·A2 + B1·B2). Two layouts exist:

- new (LyCORIS today): a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in·k·k) (or (r, in, kh, kw));
- old: a1 (r, in), a2 (in, r), b1 (r, in·k·k), b2 (out, r).

Any factor may carry 1×1 conv axes. A layout is taken when every shape agrees with it (ranks shared, a1/a2 in
the same input width); when both agree the weight decides, and when it cannot either, the new layout is used.
Nothing assumes in > r: a conv_in of 4 channels with rank 8 is (4, 8), (8, 4), (out, 8), (8, 36) in the new layout.
"""
from __future__ import annotations

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from . import functional as fn
from .base import Adapter, Shape, Tensor, fits_columns, trailing_ones, weight_kind_error

NEW, OLD = False, True
KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


class GLoRA(Adapter):
    needs_weight = True
    kind = "glora"
    detect = TYPE_DETECT["glora"]
    keys = TYPE_LEAVES["glora"]
    layouts: tuple[bool, ...]  # the layouts (NEW/OLD) the factors' shapes agree with, set by validate

    def validate(self) -> None:
        self.need(*KEYS)
        for key in KEYS:
            self.dims(key, 2, 4)
        self.layouts = tuple(old for old in (NEW, OLD) if self._consistent(old))
        if not self.layouts:
            shapes = ", ".join(f"{k.split('.')[0]} {tuple(self.t[k].shape)}" for k in KEYS)
            raise self.fail(f"GLoRA factors {shapes} fit neither layout (new: a1 (in, r), a2 (r, in), b1 (out, r), "
                            "b2 (r, in·k·k); old: a1 (r, in), a2 (in, r), b1 (r, in·k·k), b2 (out, r))")

    def _parts(self, old: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A factor on W's input axis (in, r), A factor back (r, in), B's (out, r), B's (r, columns…))."""
        a1, a2, b1, b2 = (self.t[k] for k in KEYS)
        return (a2, a1, b2, b1) if old else (a1, a2, b1, b2)

    def _consistent(self, old: bool) -> bool:
        first, second, up, down = self._parts(old)
        r = first.shape[1]
        square = trailing_ones(first) and trailing_ones(second) and trailing_ones(up)
        return square and second.shape[0] == up.shape[1] == down.shape[0] == r and second.shape[1] == first.shape[0]

    @property
    def old_layout(self) -> bool:
        """The layout the shapes show (the new one when both fit: the weight alone could tell, see ``layout``)."""
        return self.layouts[0]

    def layout(self, weight_shape: Shape) -> bool | None:
        """The layout whose shapes fit a weight of ``weight_shape`` (``OLD``/``NEW``), ``None`` when none does."""
        for old in self.layouts:
            first, _, up, down = self._parts(old)
            if up.shape[0] == weight_shape[0] and first.shape[0] == weight_shape[1] and \
                    fits_columns(tuple(down.shape[1:]), weight_shape):
                return old
        return None

    @property
    def rank(self) -> int:
        return int(self._parts(self.old_layout)[0].shape[1])

    def widths(self) -> tuple[int | None, int | None]:
        first, _, up, _ = self._parts(self.old_layout)
        return int(up.shape[0]), int(first.shape[0])

    def shape_error(self, weight_shape: Shape) -> str | None:
        err = weight_kind_error("GLoRA", weight_shape)
        if err or self.layout(weight_shape) is not None:
            return err
        first, _, up, down = self._parts(self.old_layout)
        return (f"GLoRA maps {first.shape[0]}→{up.shape[0]} channels ({'old' if self.old_layout else 'new'} layout, "
                f"B columns {tuple(down.shape[1:])}), the weight is {tuple(weight_shape)}")

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        g = self.get
        return fn.glora_delta(weight, g("a1.weight"), g("a2.weight"), g("b1.weight"), g("b2.weight"),
                              self.scale() * strength, bool(self.layout(weight.shape)))
