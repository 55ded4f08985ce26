"""LoKr: ΔW = s·kron(W1, W2); each factor whole or decomposed (``_a``/``_b``), W2 optionally Tucker.
s = α/r only when a factor is decomposed, else 1.

Shapes: W1 (o₁, i₁) = ``lokr_w1`` or w1_a (o₁, r) @ w1_b (r, i₁). W2 (o₂, i₂[, kh, kw]) = ``lokr_w2``, or
w2_a (o₂, r) @ w2_b (r, i₂[, kh, kw]), or Tucker ``tucker(lokr_t2 (r, r, kh, kw), w2_a (r, o₂), w2_b (r, i₂))``.
W2 may also hold its columns flattened, (o₂, i₂·kh·kw). ΔW is (o₁·o₂, i₁·i₂, kh, kw).
"""
from __future__ import annotations

import torch

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from . import functional as fn
from .base import Adapter, Pieces, Shape, Tensor, numel, same_kernel, weight_kind_error


class LoKr(Adapter):
    kind = "lokr"
    detect = TYPE_DETECT["lokr"]
    keys = TYPE_LEAVES["lokr"]

    def validate(self) -> None:
        for n in ("1", "2"):
            whole, parts = f"lokr_w{n}", (f"lokr_w{n}_a", f"lokr_w{n}_b")
            if whole in self.t and any(p in self.t for p in parts + (f"lokr_t{n}",)):
                raise self.fail(f"{whole} and its decomposition {'/'.join(parts)} are both given")
            if whole not in self.t:
                self.need(*parts)
        self.factor_shapes()  # checks every factor's dimensions and ranks

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of W1 (o₁, i₁) and W2 (o₂, i₂[, kh, kw]) from the factors' shapes alone."""
        if "lokr_w1" in self.t:
            w1 = tuple(self.dims("lokr_w1", 2, what="(o1, i1)").shape)
        else:
            w1 = self._product("lokr_w1_a", "lokr_w1_b", 2)
        if "lokr_w2" in self.t:
            return w1, tuple(self.dims("lokr_w2", 2, 4, what="(o2, i2) or (o2, i2, kh, kw)").shape)
        if "lokr_t2" in self.t:
            t = self.dims("lokr_t2", 4, what="a 4-d Tucker core (r, r, kh, kw)")
            a, b = self.dims("lokr_w2_a", 2, what="(r, o2)"), self.dims("lokr_w2_b", 2, what="(r, i2)")
            if (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
                raise self.fail(f"lokr_t2 {tuple(t.shape)} does not match the ranks of lokr_w2_a {tuple(a.shape)} "
                                f"and lokr_w2_b {tuple(b.shape)}")
            return w1, (a.shape[1], b.shape[1], *t.shape[2:])
        return w1, self._product("lokr_w2_a", "lokr_w2_b", 4)

    def _product(self, a_key: str, b_key: str, max_dims: int) -> tuple[int, ...]:
        a = self.dims(a_key, 2, what="(o, r)")
        b = self.dims(b_key, *range(2, max_dims + 1, 2), what="(r, i)" if max_dims == 2 else "(r, i[, kh, kw])")
        if a.shape[1] != b.shape[0]:
            raise self.fail(f"{a_key} {tuple(a.shape)} and {b_key} {tuple(b.shape)} ranks differ")
        return (a.shape[0], *b.shape[1:])

    @property
    def rank(self) -> int | None:
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in self.t:
                return int(self.t[k].shape[0])
        return None

    def scale(self) -> float:
        if "scale" in self.t:
            return self.number("scale")  # type: ignore[return-value]
        return 1.0 if self.rank is None else super().scale()

    def widths(self) -> tuple[int | None, int | None]:
        out, inp, *_ = self.implied_shape()
        return out, inp

    def delta_rows(self, pieces: Pieces, fused_shape: Shape, strength: float, dyn: int | None = None) -> Tensor:
        """Only the rows asked for: row r of kron(W1, W2) is row r // o₂ of W1 ⊗ row r % o₂ of W2, so a row range
        needs the W1 rows that cover it (at most one W1 row more at each end)."""
        w1, w2 = self._factors()
        o2 = w2.shape[0]
        parts = []
        for a, b in pieces:
            lo, hi = a // o2, -(-b // o2)
            shape = torch.Size(((hi - lo) * o2, *fused_shape[1:]))
            parts.append(fn.lokr_delta(w1[lo:hi], w2, self.scale() * strength, shape)[a - lo * o2:b - lo * o2])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def implied_shape(self) -> tuple[int, ...]:
        """The weight shape the factors fix when W2 keeps its kernel axes: (o₁·o₂, i₁·i₂, kernel…)."""
        (o1, i1), w2 = self.factor_shapes()
        return (o1 * w2[0], i1 * w2[1], *w2[2:])

    def shape_error(self, weight_shape: Shape) -> str | None:
        err = weight_kind_error("LoKr", weight_shape)
        if err:
            return err
        (o1, i1), w2 = self.factor_shapes()
        kernel = tuple(weight_shape[2:])
        if len(w2) == 2:  # flattened columns (i₂·kh·kw): whole kernels, row-major
            fits = w2[1] % numel(kernel) == 0 and i1 * (w2[1] // numel(kernel)) == weight_shape[1]
        else:
            fits = same_kernel(w2[2:], kernel) and i1 * w2[1] == weight_shape[1]
        if not fits or o1 * w2[0] != weight_shape[0]:
            return f"LoKr makes kron(({o1}, {i1}), {w2}), which does not fit the weight {tuple(weight_shape)}"
        return None

    def _factors(self) -> tuple[Tensor, Tensor]:
        g = self.f32
        return (fn.lokr_factor(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), None),
                fn.lokr_factor(g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), g("lokr_t2")))

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        w1, w2 = self._factors()
        return fn.lokr_delta(w1, w2, self.scale() * strength, weight.shape)
