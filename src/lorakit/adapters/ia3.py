"""IA3: ΔW = W ⊙ w along the input (``on_input``) or output axis. ``weight`` is a vector — (n,), or shaped like
LyCORIS' (1, in[, 1, 1]) / (out, 1[, 1, 1]) — with n the size of that axis; ``on_input`` one number."""
from __future__ import annotations

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from . import functional as fn
from .base import Adapter, Pieces, Shape, Tensor, gather_rows, weight_kind_error


class IA3(Adapter):
    needs_weight = True
    kind = "ia3"
    detect = TYPE_DETECT["ia3"]
    keys = TYPE_LEAVES["ia3"]

    def validate(self) -> None:
        self.need("weight", "on_input")
        v = self.t["weight"]
        if sum(s != 1 for s in v.shape) > 1:
            raise self.fail(f"IA3 weight must be a vector (one axis longer than 1), got shape {tuple(v.shape)}")

    @property
    def on_input(self) -> bool:
        return bool(self.t["on_input"])

    def widths(self) -> tuple[int | None, int | None]:
        n = self.t["weight"].numel()
        return (None, n) if self.on_input else (n, None)

    def rows_alike(self) -> bool:
        return self.on_input

    def rows(self, pieces: Pieces, where: str) -> "IA3":
        """W ⊙ w scales columns (the same for every row) or rows (then the rows' scales)."""
        if self.on_input:
            return IA3(dict(self.t), where)
        return IA3({**self.t, "weight": gather_rows(self.t["weight"].flatten(), pieces)}, where)

    def shape_error(self, weight_shape: Shape) -> str | None:
        err = weight_kind_error("IA3", weight_shape)
        if err:
            return err
        n = self.t["weight"].numel()
        axis = 1 if self.on_input else 0
        if weight_shape[axis] != n:
            side = "input" if self.on_input else "output"
            return f"IA3 vector of {n} values does not fit the {side} axis of the weight {tuple(weight_shape)}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        return fn.ia3_delta(weight, self.get("weight"), self.on_input).mul_(strength)
