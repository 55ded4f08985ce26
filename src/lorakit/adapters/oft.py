"""OFT (kohya and LyCORIS ``oft_blocks`` (n, b, b); old LyCORIS ``oft_diag``) and BOFT (``oft_blocks``
(m, n, b, b)): orthogonal rotations of the output axis. ``alpha`` is the constraint c (limit c·out on ‖Q‖).

``oft_blocks`` hold B with R = Cayley(B − Bᵀ); old LyCORIS (≤ 2.x) saved the rotation itself as ``oft_diag``
(its forward used ``r = oft_diag`` directly, as A1111 does), with an optional per-block ``rescale`` (n, b, 1)
multiplying R."""
from __future__ import annotations

import torch

from . import functional as fn
from .base import Adapter, Tensor


class OFT(Adapter):
    needs_weight = True
    kind = "oft"
    detect = ("oft_blocks", "oft_diag")
    keys = ("oft_blocks", "oft_diag", "rescale", "alpha")

    def validate(self) -> None:
        if "oft_blocks" not in self.t and "oft_diag" not in self.t:
            raise self.fail("OFT layer lacks oft_blocks")
        if self.blocks.dim() not in (3, 4) or self.blocks.shape[-1] != self.blocks.shape[-2]:
            raise self.fail(f"oft_blocks must be (n, b, b) or (m, n, b, b), got {tuple(self.blocks.shape)}")
        if self.butterfly and self.blocks.shape[-1] % 2:
            raise self.fail(f"BOFT blocks must have an even size, got {tuple(self.blocks.shape)}")

    @property
    def blocks(self) -> Tensor:
        return self.t["oft_blocks"] if "oft_blocks" in self.t else self.t["oft_diag"]

    @property
    def butterfly(self) -> bool:
        return self.blocks.dim() == 4

    @property
    def kind_name(self) -> str:
        return "boft" if self.butterfly else "oft"

    @property
    def rank(self) -> int:
        return int(self.blocks.shape[-3])  # number of blocks (kohya's network_dim)

    def shape_error(self, weight_shape: torch.Size) -> str | None:
        n, b = self.blocks.shape[-3], self.blocks.shape[-1]
        if n * b != weight_shape[0]:
            return f"OFT blocks cover {n}×{b} output channels, the weight has {weight_shape[0]}"
        return None

    def delta(self, weight: Tensor, strength: float, dyn: int | None = None) -> Tensor:
        c = (self.alpha or 0.0) * weight.shape[0]
        rescale = self.f32("rescale")
        blocks = self.blocks.float()
        if self.butterfly:
            return fn.boft_delta(weight, blocks, c, rescale, strength)
        if "oft_diag" in self.t:
            rotation = blocks if rescale is None else rescale.reshape(blocks.shape[0], -1, 1) * blocks
            return fn.oft_delta(weight, rotation, None, strength)
        return fn.oft_delta(weight, fn.cayley(blocks, c), rescale, strength)
