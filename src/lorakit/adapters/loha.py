"""LoHa: ΔW = s·(w1a@w1b) ⊙ (w2a@w2b), optionally Tucker (``hada_t1``, ``hada_t2``).

Shapes: plain — w·a (out, r), w·b (r, in·kh·kw) (or (r, in, kh, kw)); Tucker (conv only) — t· (r, r, kh, kw),
w·a (r, out), w·b (r, in), each factor rebuilt as ``tucker(t, wa, wb)``. Both Hadamard factors must have W's shape
exactly: a factor that only broadcasts to it (a 2-D core, a factor of one row) would make a tensor far larger than
the layer, so it is refused.
"""
from __future__ import annotations

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from . import functional as fn
from .base import Adapter, Pieces, Shape, Tensor, fits_columns, gather_rows, numel, weight_kind_error

FACTORS = (("hada_w1_a", "hada_w1_b", "hada_t1"), ("hada_w2_a", "hada_w2_b", "hada_t2"))


class LoHa(Adapter):
    kind = "loha"
    detect = TYPE_DETECT["loha"]
    keys = TYPE_LEAVES["loha"]

    def validate(self) -> None:
        self.need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if ("hada_t1" in self.t) != ("hada_t2" in self.t):
            raise self.fail("LoHa Tucker needs both hada_t1 and hada_t2, the layer has one")
        made = [self._tucker_shape(*f) if self.tucker else self._plain_shape(*f) for f in FACTORS]
        if made[0] != made[1]:
            raise self.fail(f"the two Hadamard factors differ in shape: {made[0]} and {made[1]}")

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.t

    def _plain_shape(self, a_key: str, b_key: str, _: str) -> tuple[int, ...]:
        """(out, in·k·k columns…) of ``a @ b``: a (out, r), b (r, …)."""
        a, b = self.dims(a_key, 2, what="(out, r)"), self.dims(b_key, 2, 4, what="(r, in·kh·kw) or (r, in, kh, kw)")
        if a.shape[1] != b.shape[0]:
            raise self.fail(f"{a_key} {tuple(a.shape)} and {b_key} {tuple(b.shape)} ranks differ")
        return (a.shape[0], *b.shape[1:])

    def _tucker_shape(self, a_key: str, b_key: str, t_key: str) -> tuple[int, ...]:
        """(out, in, kh, kw) of ``tucker(t, a, b)``: t (r₁, r₂, kh, kw), a (r₁, out), b (r₂, in)."""
        t = self.dims(t_key, 4, what="a 4-d Tucker core (r, r, kh, kw)")
        a, b = self.dims(a_key, 2, what="(r, out) with Tucker"), self.dims(b_key, 2, what="(r, in) with Tucker")
        if (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
            raise self.fail(f"{t_key} {tuple(t.shape)} does not match the ranks of {a_key} {tuple(a.shape)} and "
                            f"{b_key} {tuple(b.shape)}")
        return (a.shape[1], b.shape[1], *t.shape[2:])

    @property
    def rank(self) -> int:
        return int(self.t["hada_w1_b"].shape[0])

    def widths(self) -> tuple[int | None, int | None]:
        made = self._tucker_shape(*FACTORS[0]) if self.tucker else self._plain_shape(*FACTORS[0])
        return made[0], made[1] if len(made) == 2 or self.tucker else None

    def rows(self, pieces: Pieces, where: str) -> "LoHa | None":
        """Rows of (w1a@w1b)⊙(w2a@w2b) are those of w1a and w2a (plain layout; Tucker cores are convolutions)."""
        if self.tucker:
            return None
        return LoHa({**self.t, "hada_w1_a": gather_rows(self.t["hada_w1_a"], pieces),
                     "hada_w2_a": gather_rows(self.t["hada_w2_a"], pieces)}, where)

    def shape_error(self, weight_shape: Shape) -> str | None:
        err = weight_kind_error("LoHa", weight_shape)
        if err:
            return err
        made = self._tucker_shape(*FACTORS[0]) if self.tucker else self._plain_shape(*FACTORS[0])
        if self.tucker:
            fits = made == tuple(weight_shape)
        else:
            fits = made[0] == weight_shape[0] and fits_columns(made[1:], weight_shape)
        if not fits or numel(made) != numel(weight_shape):
            return f"LoHa makes a {made} change, the weight is {tuple(weight_shape)}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        g = self.get
        t1, t2 = (self.get("hada_t1"), self.get("hada_t2")) if self.tucker else (None, None)
        return fn.loha_delta(g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"), g("hada_w2_b"), t1, t2,
                             self.scale() * strength, weight.shape)
