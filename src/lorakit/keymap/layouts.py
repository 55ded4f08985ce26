"""An original layout as data: the module names of a family's own checkpoints (BFL's FLUX.1, SAI's SD3) → the
diffusers modules lorakit's models have, with the fused layers (``Fused``: several model modules stacked along the
rows, some with their halves swapped), and the way back for writers (``LayoutMap``).

A ``LayoutMap`` is a table of top-level modules and one table per kind of block (``double_blocks.{i}`` →
``transformer_blocks.{i}``). Sizes are never written here: a fused layer's rows are split by the hidden width the
layer itself shows (its input width), so a tiny test model and the full-size one go through the same code; the
model's own shapes then check each part (``patch.plan``).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

Pieces = tuple[tuple[int, int], ...]  # source row ranges, in the target's row order


@dataclass(frozen=True)
class Fused:
    """An original-layout module that is several model modules stacked along the rows (``targets`` in row order).
    ``rest_last``: every target but the last has the hidden width's rows, the last the rows left (``linear1``'s
    MLP part); otherwise all targets are equal. ``swap``: one target whose halves are swapped — with ``swap_only``
    set, only when the layer has ``swap_only`` × hidden rows, else it is the target as it is (SD3's context adaLN:
    2·h rows and swapped in the last block, 6·h and not swapped in the others)."""

    targets: tuple[str, ...]
    rest_last: bool = False
    swap: bool = False
    swap_only: int = 0

    def swapped(self, rows: int, hidden: int | None) -> bool:
        """Whether a layer of ``rows`` rows reading ``hidden`` inputs has its halves swapped."""
        return self.swap and (not self.swap_only or hidden is not None and rows == self.swap_only * hidden)

    def pieces(self, rows: int, hidden: int | None) -> list[tuple[str, Pieces]] | str:
        """Each target with its source row ranges, or the reason the rows cannot be split."""
        n = len(self.targets)
        if self.swap_only and hidden is None:
            return "the hidden width is unknown (no layer of the file shows its input width)"
        if self.swap and not self.swapped(rows, hidden):
            return [(self.targets[0], ((0, rows),))]
        if self.swap:
            if rows % 2:
                return f"{rows} rows cannot be two swapped halves"
            h = rows // 2
            return [(self.targets[0], ((h, rows), (0, h)))]
        if self.rest_last:
            if hidden is None:
                return "the hidden width is unknown (no layer of the file shows its input width)"
            if rows <= (n - 1) * hidden:
                return f"{rows} rows leave nothing for {self.targets[-1]} after {n - 1}×{hidden}"
            edges = [i * hidden for i in range(n)] + [rows]
        else:
            if rows % n or (hidden is not None and rows != n * hidden):
                want = f"{n}×{hidden} = {n * hidden}" if hidden is not None else f"a multiple of {n}"
                return f"{rows} rows, expected {want}"
            edges = [i * rows // n for i in range(n + 1)]
        return [(t, ((edges[i], edges[i + 1]),)) for i, t in enumerate(self.targets)]

    def under(self, prefix: str) -> "Fused":
        """The same layer with ``prefix`` before every target path."""
        return replace(self, targets=tuple(prefix + t for t in self.targets))


Target = str | Fused  # a model module path, or several


@dataclass(frozen=True)
class Blocks:
    """One kind of block: ``original.{i}.<name>`` is ``model.{i}.<table[name]>``."""

    original: str
    model: str
    table: Mapping[str, Target]


class LayoutMap:
    """An original layout ↔ the model's names. ``heads``: the top-level names only the original layout has;
    ``read_only``: block-relative names some readers take that no checkpoint of the layout has (aliases)."""

    def __init__(self, top: Mapping[str, Target], blocks: tuple[Blocks, ...], heads: tuple[str, ...],
                 read_only: re.Pattern[str] | None = None) -> None:
        self.top, self.blocks, self.heads, self.read_only = top, blocks, heads, read_only
        kinds = "|".join(re.escape(b.original) for b in blocks)
        self._block = re.compile(rf"({kinds})\.(\d+)\.(.+)")
        self._model_block = re.compile(rf"({'|'.join(re.escape(b.model) for b in blocks)})\.(\d+)\.(.+)")
        self._plain, self._parts = self._inverse()

    def is_original(self, path: str) -> bool:
        """Whether a denoiser module path is in the original layout."""
        return path.split(".", 1)[0] in self.heads

    def to_model(self, path: str) -> Target | None:
        """The model module(s) of an original-layout module path; ``None`` when the name is not the layout's."""
        m = self._block.fullmatch(path)
        if m is None:
            return self.top.get(path)
        kind = next(b for b in self.blocks if b.original == m[1])
        target = kind.table.get(m[3])
        prefix = f"{kind.model}.{m[2]}."
        if target is None or isinstance(target, str):
            return None if target is None else prefix + target
        return target.under(prefix)

    def _alias(self, name: str) -> bool:
        return self.read_only is not None and self.read_only.fullmatch(name) is not None

    def _inverse(self) -> tuple[dict[str, str], dict[str, tuple[str, Fused, int]]]:
        """Model module (block index as ``{}``) → its one-to-one original name; and → (fused original module, its
        ``Fused``, the part's index) for the parts of a fused layer. Aliases are for reading only."""
        plain: dict[str, str] = {}
        parts: dict[str, tuple[str, Fused, int]] = {}
        tables = [("", "", self.top)] + [(f"{b.original}.{{}}.", f"{b.model}.{{}}.", b.table) for b in self.blocks]
        for original_prefix, model_prefix, table in tables:
            for name, target in table.items():
                if self._alias(name):
                    continue
                if isinstance(target, str):
                    plain.setdefault(model_prefix + target, original_prefix + name)
                    continue
                whole = target.under(model_prefix)
                for i, t in enumerate(target.targets):
                    parts[model_prefix + t] = (original_prefix + name, whole, i)
        return plain, parts

    def _templated(self, path: str) -> tuple[str, str | None]:
        """``transformer_blocks.3.attn.to_q`` → (``transformer_blocks.{}.attn.to_q``, ``3``)."""
        m = self._model_block.fullmatch(path)
        return (path, None) if m is None else (f"{m[1]}.{{}}.{m[3]}", m[2])

    def to_original(self, path: str) -> str | None:
        """The original module of a model module when one is the other renamed; ``None`` for a part of a fused
        layer (``fused_home``) or a name that is not the layout's."""
        template, index = self._templated(path)
        found = self._plain.get(template)
        return None if found is None else found.format(index)

    def fused_home(self, path: str) -> tuple[str, Fused, int] | None:
        """For a model module that is some rows of a fused original layer: (the original module, its ``Fused`` with
        the model paths of every part in row order, this part's index); ``None`` otherwise."""
        template, index = self._templated(path)
        found = self._parts.get(template)
        if found is None:
            return None
        name, fused, i = found
        return name.format(index), replace(fused, targets=tuple(t.format(index) for t in fused.targets)), i

    def is_written(self, path: str) -> bool:
        """Whether an original module path is one the layout's checkpoints have, not an alias some readers take."""
        m = self._block.fullmatch(path)
        return self.to_model(path) is not None and (m is None or not self._alias(m[3]))


@dataclass(frozen=True)
class SingleFile:
    """How a DiT family's single-file checkpoints hold its transformer — the one description ``models`` (loading)
    and ``tools`` (bake/extract) read them by: ``marker``, a key only its files have (prefixes stripped);
    ``to_model``, a file module → the model's module(s) (fused rows split by the width ``hidden``'s rows show);
    ``is_bare``, whether a key of a file without prefixes is the transformer's; ``renames``, parameter names the
    file spells otherwise (BFL's RMSNorm ``scale``); ``text_encoders``, component → key prefix (HF names) in an
    all-in-one file; ``ldm_vae``: an all-in-one file's VAE (``vae.``/``first_stage_model.``) is an LDM
    ``AutoencoderKL``; ``model_class``: the diffusers transformer class."""

    model_class: str
    marker: re.Pattern[str]
    to_model: Callable[[str], Target | None]
    is_bare: Callable[[str], bool]
    renames: Mapping[str, str] = field(default_factory=dict)
    text_encoders: Mapping[str, str] = field(default_factory=dict)
    ldm_vae: bool = False
    hidden: str = "img_in.weight"
    prefixes: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")

    def transformer_keys(self, keys: Mapping[str, object] | list[str]) -> dict[str, str]:
        """The file's transformer keys: the name without its prefix → the file's key."""
        out: dict[str, str] = {}
        for key in keys:
            prefix = next((p for p in self.prefixes if key.startswith(p)), None)
            if prefix is not None:
                out[key[len(prefix):]] = key
            elif self.is_bare(key):
                out[key] = key
        return out

    def claims(self, keys: Mapping[str, object] | list[str]) -> bool:
        """Whether a single file with these keys is this family's."""
        return any(self.marker.search(k) for k in self.transformer_keys(keys))
