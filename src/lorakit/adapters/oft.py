"""OFT (kohya and LyCORIS ``oft_blocks`` (n, b, b); old LyCORIS ``oft_diag``) and BOFT (``oft_blocks``
(m, n, b, b)): orthogonal rotations of the output axis. ``alpha`` is the constraint c (limit c·out on ‖Q‖).

``oft_blocks`` hold B with R = Cayley(B − Bᵀ); old LyCORIS (≤ 2.x) saved the rotation itself as ``oft_diag``
(its forward used ``r = oft_diag`` directly, as A1111 does), with an optional per-block ``rescale`` (n, b, 1)
multiplying R. The blocks cover the output axis: n·b = out; BOFT's m butterfly stages need n divisible by 2^(m−1)
and an even b."""
from __future__ import annotations

from ..keymap.leaves import TYPE_DETECT, TYPE_LEAVES
from . import functional as fn
from .base import Adapter, Shape, Tensor, weight_kind_error


class OFT(Adapter):
    needs_weight = True
    kind = "oft"
    detect = TYPE_DETECT["oft"]
    keys = TYPE_LEAVES["oft"]

    def validate(self) -> None:
        if "oft_blocks" in self.t and "oft_diag" in self.t:
            raise self.fail("OFT layer has both oft_blocks and oft_diag")
        key = "oft_blocks" if "oft_blocks" in self.t else "oft_diag"
        if key not in self.t:
            raise self.fail("OFT layer lacks oft_blocks")
        blocks = self.dims(key, 3, 4, what="(n, b, b) or (m, n, b, b)") if key == "oft_blocks" else \
            self.dims(key, 3, what="(n, b, b)")
        if blocks.shape[-1] != blocks.shape[-2]:
            raise self.fail(f"{key} blocks must be square, got shape {tuple(blocks.shape)}")
        if self.butterfly and blocks.shape[-1] % 2:
            raise self.fail(f"BOFT blocks must have an even size, got {tuple(blocks.shape)}")
        rescale = self.t.get("rescale")
        if rescale is not None and rescale.numel() != self.covers:
            raise self.fail(f"rescale has {rescale.numel()} values, the blocks cover {self.covers} output channels")

    @property
    def blocks(self) -> Tensor:
        return self.t["oft_blocks"] if "oft_blocks" in self.t else self.t["oft_diag"]

    @property
    def butterfly(self) -> bool:
        return self.blocks.dim() == 4

    @property
    def covers(self) -> int:
        """n·b: the output channels the blocks rotate."""
        return int(self.blocks.shape[-3] * self.blocks.shape[-1])

    @property
    def kind_name(self) -> str:
        return "boft" if self.butterfly else "oft"

    def widths(self) -> tuple[int | None, int | None]:
        return self.covers, None

    @property
    def rank(self) -> int:
        return int(self.blocks.shape[-3])  # number of blocks (kohya's network_dim)

    def shape_error(self, weight_shape: Shape) -> str | None:
        err = weight_kind_error("OFT", weight_shape)
        if err:
            return err
        n, b = self.blocks.shape[-3], self.blocks.shape[-1]
        if self.covers != weight_shape[0]:
            return f"OFT blocks cover {n}×{b} output channels, the weight has {weight_shape[0]}"
        stages = self.blocks.shape[0] if self.butterfly else 1
        if stages - 1 > n.bit_length() or n % 2 ** (stages - 1):
            return f"BOFT's {stages} butterfly stages need a block count divisible by 2^{stages - 1}, got {n}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        c = (self.alpha or 0.0) * weight.shape[0]
        rescale = self.f32("rescale")
        blocks = self.blocks.float()
        if self.butterfly:
            return fn.boft_delta(weight, blocks, c, rescale, strength)
        if "oft_diag" in self.t:
            return fn.oft_delta(weight, fn.oft_diag_rotation(blocks, rescale), None, strength)
        return fn.oft_delta(weight, fn.cayley(blocks, c), rescale, strength)
