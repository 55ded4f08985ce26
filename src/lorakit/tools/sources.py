"""The inputs of a tool and what the output says about them.

``FILE[:weights]`` takes the prompt syntax's arguments after the name — ``A.safetensors:0.7``,
``B.safetensors:te=0.5:unet=1``, ``C.safetensors:1:lbw=OUTD`` (te/unet, in/mid/out, lbw, dyn; no step
schedules: a file has one strength per layer). Output metadata names every source with its hashes and weight,
carries the union of their trigger words and tag frequencies, and the kohya keys readers look at.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorakitError, ToolError
from ..files.hashes import file_hashes
from ..keymap.arch import Arch
from ..keymap.families import FLUX1, SD, family_of_arch
from ..library.training import trigger_words
from ..lora_model import LoraModel, load_lora
from ..patch.weights import Weight, as_weight

# kohya's names of SD1/SD2/SDXL and FLUX.1 ("flux-1/lora" when dev/schnell is not known), from the families'
# ``modelspec`` (what ``train.output`` reads)
BASE_VERSION: dict[str, str] = {a: names[0] for f in (SD, FLUX1) for a, names in f.modelspec.items()}
MODELSPEC: dict[str, str] = {a: names[1] for f in (SD, FLUX1) for a, names in f.modelspec.items()}


@dataclass
class Source:
    """One input LoRA with the weight it is used at (``spec``: the weight part as written)."""

    path: Path
    lora: LoraModel
    weight: Weight
    spec: str

    def describe(self) -> dict[str, object]:
        h = file_hashes(self.path, self.lora.metadata)
        return {"file": self.path.name, "sha256": h.sha256, "autov2": h.autov2, "addnet": h.addnet,
                "weight": self.spec or "1", "applied_as": self.weight.describe()}


def split_spec(spec: str) -> tuple[Path, str]:
    """``path[:weights]``: the longest prefix that names an existing file (so ``C:\\x.safetensors`` works)."""
    cuts = [i for i, c in enumerate(spec) if c == ":"] + [len(spec)]
    for i in reversed(cuts):
        if Path(spec[:i]).is_file():
            return Path(spec[:i]), spec[i + 1:]
    raise ToolError(f"{spec}: no such LoRA file (give FILE or FILE:WEIGHTS, e.g. a.safetensors:0.7)")


def parse_weight(text: str, where: str = "") -> Weight:
    """The prompt syntax's arguments (``0.7``, ``te=0.5:unet=1``, ``1:lbw=OUTD``) as a ``Weight``."""
    if not text.strip():
        return as_weight(1.0)
    from ..prompt import parse_prompt

    try:
        refs = parse_prompt(f"<lora:x:{text}>").loras
    except LorakitError as e:
        raise ToolError(f"{where}: bad weight {text!r} ({str(e).splitlines()[0]})") from None
    if len(refs) != 1 or refs[0].negative:
        raise ToolError(f"{where}: bad weight {text!r}")
    if refs[0].scheduled:
        raise ToolError(f"{where}: {text!r} changes during sampling (step schedule, start/stop); a merged file has "
                        "one strength per layer")
    return as_weight(refs[0].spec())


def load_sources(specs: Sequence[str]) -> list[Source]:
    out = []
    for spec in specs:
        path, weights = split_spec(spec)
        out.append(Source(path, load_lora(path), parse_weight(weights, spec), weights))
    return out


def common_arch(loras: Iterable[LoraModel]) -> str:
    """The one architecture of the inputs (unknown ones fit any); a ``ToolError`` when two disagree."""
    found: dict[str, str] = {}
    for lora in loras:
        if lora.arch != Arch.UNKNOWN:
            found.setdefault(lora.arch, lora.path or lora.name)
    if len(found) > 1:
        raise ToolError("the inputs are for different models: " + ", ".join(f"{p} ({a})" for a, p in found.items()))
    return next(iter(found), Arch.UNKNOWN)


def source_metadata(tool: str, sources: Sequence[Source]) -> dict[str, str]:
    """Sources with hashes and weights, union of trigger words and tag frequencies (namespaced by file)."""
    meta = {"lorakit.tool": tool, "lorakit.sources": json.dumps([s.describe() for s in sources])}
    words: list[str] = []
    for s in sources:
        words += [w for w in trigger_words(s.lora.metadata) if w not in words]
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    tags: dict[str, object] = {}
    for s in sources:
        try:
            freq = json.loads(s.lora.metadata.get("ss_tag_frequency", "{}"))
        except (ValueError, RecursionError):  # the C decoder's own depth guard: safe to catch (library.training)
            continue
        if isinstance(freq, dict):
            tags.update({f"{s.path.stem}/{k}": v for k, v in freq.items()})
    if tags:
        meta["ss_tag_frequency"] = json.dumps(tags)
    return meta


def lora_metadata(arch: str, ranks: Sequence[int], alphas: Sequence[float], title: str) -> dict[str, str]:
    """The keys kohya-reading tools look at: network module, dim and alpha ("Dynamic" when they vary), base."""
    meta = {"ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks[0]) if len(set(ranks)) == 1 else "Dynamic",
            "ss_network_alpha": f"{alphas[0]:g}" if len(set(alphas)) == 1 else "Dynamic",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.title": title,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"), "modelspec.implementation": "lorakit"}
    names = family_of_arch(arch).modelspec.get(arch)  # kohya's names of the base (``Family.modelspec``)
    if names is not None:
        meta.update({"ss_base_model_version": names[0], "ss_v2": str(arch == Arch.SD2),
                     "modelspec.architecture": f"{names[1]}/lora"})
    return meta
