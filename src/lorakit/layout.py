"""Canonical groups → one adapter per model module: where the file's module names are the model's, each group is
one adapter; where a family's files use an original layout (FLUX.1's BFL names), each module is renamed, and a
fused one (``qkv``, ``linear1``, the final adaLN) is built as one adapter and split into exact parts
(``adapters.rows.split_rows``) — one fused layer at a time, by the row ranges ``keymap`` gives for the hidden width
the layer itself shows."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .adapters import Adapter, build_adapter, split_rows
from .errors import InvalidLora
from .keymap.families import Family
from .keymap.layouts import Fused

Groups = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Origin:
    """Where a part came from: the file's fused module (canonical path in the file's layout) and its adapter, whole.
    Set on every part of a split layer (``adapter.origin``), so writers can put the layer back as the file had it."""

    module: str
    adapter: Adapter
    parts: tuple[str, ...]
# Original-layout parameters that are a module's whole weight, not a LoRA leaf: BFL's RMSNorm calls its weight
# ``scale`` (BFL control LoRAs ship new q/k norm scales as ``…query_norm.scale``), which replaces the weight.
WHOLE_WEIGHT = {"scale": "set_weight"}


def build_layers(groups: Groups, family: Family, path: str | None) -> tuple[dict[str, Adapter], list[str]]:
    """``{model module path: adapter}`` and the keys no adapter consumed. ``InvalidLora`` (naming ``path``) for a
    layer whose tensors contradict themselves, a fused layer whose rows cannot be split, or a module given twice."""
    layers: dict[str, Adapter] = {}
    origin: dict[str, str] = {}
    leftovers: list[str] = []
    fused: list[tuple[str, dict[str, torch.Tensor], Fused]] = []
    for module, leaves in groups.items():
        target: str | Fused | None = module
        component, _, inner = module.partition(".")
        if component == family.denoiser and family.to_model is not None and family.is_original(inner):
            mapped = family.to_model(inner)
            target = mapped if not isinstance(mapped, str) else f"{component}.{mapped}"
            leaves = _whole_weights(leaves, inner)
        if target is None:
            leftovers.extend(f"{module}.{leaf}" for leaf in leaves)
        elif isinstance(target, Fused):
            fused.append((module, leaves, target))
        else:
            adapter, rest = _build(leaves, target, path)
            leftovers.extend(f"{module}.{leaf}" for leaf in rest)
            if adapter is not None:
                _put(layers, origin, target, adapter, module, path)
    hidden = _hidden_width(layers, family) if fused else None
    for module, leaves, target in fused:
        parts, rest = _split(module, leaves, target, hidden, path)
        leftovers.extend(f"{module}.{leaf}" for leaf in rest)
        for part, adapter in parts.items():
            _put(layers, origin, part, adapter, module, path)
    return layers, leftovers


def _whole_weights(leaves: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    if not module.endswith(("query_norm", "key_norm")):
        return leaves
    return {WHOLE_WEIGHT.get(leaf, leaf): t for leaf, t in leaves.items()}


def _build(leaves: dict[str, torch.Tensor], where: str, path: str | None) -> tuple[Adapter | None, list[str]]:
    try:
        return build_adapter(leaves, where)
    except InvalidLora as e:
        raise InvalidLora(path, e.problem) from None


def _put(layers: dict[str, Adapter], origin: dict[str, str], target: str, adapter: Adapter, module: str,
         path: str | None) -> None:
    if target in layers:
        raise InvalidLora(path, f"module {target} is given twice: by {origin[target]} and by {module}")
    layers[target] = adapter
    origin[target] = module


def _split(module: str, leaves: dict[str, torch.Tensor], target: Fused, hidden: int | None,
           path: str | None) -> tuple[dict[str, Adapter], list[str]]:
    """The parts of one fused layer (``module``'s adapter split by ``target``'s row ranges)."""
    component = module.split(".", 1)[0]
    adapter, rest = _build(leaves, module, path)
    if adapter is None:
        return {}, rest
    rows, own_in = adapter.widths()
    parts = [f"{component}.{t}" for t in target.targets]
    if adapter.rows_alike():
        return _with_origin({part: adapter.rows((), part) or adapter for part in parts}, module, adapter), rest
    if rows is None:
        raise InvalidLora(path, f"layer {module}: a {adapter.kind} change whose output rows it does not show cannot "
                                "be split onto the model's modules")
    pieces = target.pieces(rows, own_in if own_in is not None else hidden)
    if isinstance(pieces, str):
        raise InvalidLora(path, f"layer {module}: cannot split it onto {', '.join(target.targets)}: {pieces}")
    if len(pieces) == 1 and pieces[0][1] == ((0, rows),):  # one module renamed (SD3's context adaLN, not last)
        return _with_origin({f"{component}.{pieces[0][0]}": adapter}, module, adapter), rest
    split = split_rows(adapter, tuple((f"{component}.{t}", p) for t, p in pieces), rows)
    return _with_origin(split, module, adapter), rest


def _with_origin(parts: dict[str, Adapter], module: str, adapter: Adapter) -> dict[str, Adapter]:
    origin = Origin(module, adapter, tuple(parts))
    for part in parts.values():
        part.origin = origin  # type: ignore[attr-defined]
    return parts


def origin_of(adapter: Adapter) -> Origin | None:
    """The fused layer a part came from (``None``: the layer is the file's own)."""
    found = getattr(adapter, "origin", None)
    return found if isinstance(found, Origin) else None


def file_layout(layers: dict[str, Adapter]) -> dict[str, Adapter]:
    """The layers as the file had them: the parts of a fused layer, all present, back as its one adapter under the
    file's module path (``transformer.double_blocks.0.img_attn.qkv``); every other layer as it is."""
    out: dict[str, Adapter] = {}
    for path, adapter in layers.items():
        origin = origin_of(adapter)
        if origin is not None and all(p in layers and origin_of(layers[p]) is origin for p in origin.parts):
            out.setdefault(origin.module, origin.adapter)
        else:
            out[path] = adapter
    return out


def _hidden_width(layers: dict[str, Adapter], family: Family) -> int | None:
    """The input width most of the file's denoiser layers have (FLUX: the hidden width every block layer reads; the
    text encoders' layers are not counted: CLIP-L reads 768, FLUX.1's blocks 3072), else the output width of a layer
    that writes the hidden state (a file of OFT layers shows no input width)."""
    own = {p: a for p, a in layers.items() if p.startswith(family.denoiser + ".")}
    counts = Counter(w for a in own.values() if (w := a.widths()[1]) is not None)
    if not counts:
        counts = Counter(w for p, a in own.items() if p.endswith(family.hidden_outputs)
                         and (w := a.widths()[0]) is not None)
    return counts.most_common(1)[0][0] if counts else None
