"""What ``extract`` does differently on FLUX.1: each fused BFL layer (``qkv``, ``linear1``, the final adaLN) is
extracted whole, as kohya's own FLUX extractor does — its ΔW rebuilt from the parts (rows stacked in BFL order, the
final adaLN's halves swapped back; a BFL single file's tensor read as it is), one truncated SVD, one fused LoRA
under the BFL name. The parts share nothing after an SVD of each, so this is the only exact way to write them in the
BFL layout, and one rank rule per fused layer is what every BFL-layout LoRA has. T5's layer norms (``T5LayerNorm``)
are no module a LoRA changes: a change there is listed, never written."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..keymap.families import FLUX1, Family
from .flux_fuse import swap_halves
from .modelfile import ModelFile
from .report import ToolReport

Loader = Callable[[], torch.Tensor]


def fused_weights(mb: ModelFile, mt: ModelFile, wanted: set[str], report: ToolReport,
                  family: Family = FLUX1) -> tuple[list[tuple[str, Loader, Loader]], set[str]]:
    """(original weight name, base loader, tuned loader) of every fused layer of ``family``'s layout (FLUX.1's BFL,
    SD3's SAI) whose parts both models have with the same shapes; and every parameter name these (and the T5
    norms, reported) take from the per-tensor comparison."""
    done: set[str] = set()
    layout, denoiser = family.layout, family.denoiser
    if denoiser not in wanted or layout is None:
        return [], done
    homes = {}
    for name in mb.params:
        module, _, leaf = name.rpartition(".")
        component, _, inner = module.partition(".")
        home = layout.fused_home(inner) if leaf == "weight" and component == denoiser else None
        if home is not None:
            homes[home[0]] = home[1]
    out: list[tuple[str, Loader, Loader]] = []
    for bfl, fused in sorted(homes.items()):
        names = [f"{denoiser}.{t}.weight" for t in fused.targets]
        if all(n in mb.params and n in mt.params and mb.shape(n) == mt.shape(n) for n in names):
            name = f"{denoiser}.{bfl}.weight"
            shape = mb.shape(names[0])  # SD3's context adaLN is swapped in the last block only (2·h rows)
            swap = fused.swapped(sum(mb.shape(n)[0] for n in names), shape[1] if len(shape) > 1 else None)
            out.append((name, _loader(mb, names, swap), _loader(mt, names, swap)))
            done.update(names)
    t5s = [t for t in family.plain_te if t in wanted]
    for t5 in t5s:
        for name in sorted(n for n in set(mb.params) & set(mt.params) if n.startswith(t5 + ".") and
                           len(mb.shape(n)) == 1):
            done.add(name)
            if not torch.equal(mb.values(name), mt.values(name)):
                report.leave_out(name, "changed; T5's layer norms (T5LayerNorm) are no module a LoRA changes")
    return out, done


def _loader(m: ModelFile, names: list[str], swap: bool) -> Loader:
    """The fused weight in BFL row order: a BFL file's own tensor, else the parts stacked (halves swapped back)."""
    refs = [m.params[n] for n in names]

    def load() -> torch.Tensor:
        if all(r.rows and (r.file, r.key) == (refs[0].file, refs[0].key) for r in refs):
            return dataclasses.replace(refs[0], rows=None).values(torch.float32)  # the whole tensor (fp8: dq)
        fused = torch.cat([r.values(torch.float32) for r in refs])
        return swap_halves(fused) if swap else fused
    return load
