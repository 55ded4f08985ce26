"""Dialect readers: each has ``detect(sd, metadata)`` and ``to_canonical(sd, metadata, family) -> Canonical``.

The list is tried in order; the first whose ``detect`` says yes reads the file (``detect`` runs once: a reader's
``to_canonical`` trusts it, and may still raise ``NotAMatch`` when reading shows the file is not its own). Specific
dialects come before the broad ones (kohya's prefixes are the most common and the loosest). A reader raises
``InvalidLora`` (without a path; ``load_lora`` adds it) for a file of its dialect that is broken."""
from __future__ import annotations

from types import ModuleType

import torch

from ..errors import NotAMatch
from ..keymap.families import SD, Family
from . import attnprocs, cloneofsimo, comfy, kohya, peft, xlabs
from .base import Canonical, Grouped

DIALECTS: list[ModuleType] = [cloneofsimo, xlabs, attnprocs, peft, comfy, kohya]

__all__ = ["Canonical", "Grouped", "DIALECTS", "to_canonical"]


def to_canonical(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: Family = SD) -> Canonical | None:
    """The canonical form of a state dict for a model of ``family`` (component names and the flattened-name
    vocabulary are the family's), or ``None`` when no dialect recognises it."""
    for dialect in DIALECTS:
        if not dialect.detect(sd, metadata):
            continue
        try:
            canonical: Canonical = dialect.to_canonical(sd, metadata, family)
            return canonical
        except NotAMatch:
            continue
    return None
