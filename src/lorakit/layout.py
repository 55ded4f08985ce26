"""Canonical groups → one adapter per model module: where the file's module names are the model's, each group is
one adapter; where a family's files use an original layout (FLUX.1's BFL names), each module is renamed, and a
fused one (``qkv``, ``linear1``, the final adaLN) is built as one adapter and split into exact parts
(``adapters.rows.split_rows``) — one fused layer at a time, by the row ranges ``keymap`` gives for the hidden width
the layer itself shows."""
from __future__ import annotations

from collections import Counter

import torch

from .adapters import Adapter, build_adapter, split_rows
from .errors import InvalidLora
from .keymap.families import Family
from .keymap.flux import Fused

Groups = dict[str, dict[str, torch.Tensor]]
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
        return {part: adapter.rows((), part) or adapter for part in parts}, rest
    if rows is None:
        raise InvalidLora(path, f"layer {module}: a {adapter.kind} change whose output rows it does not show cannot "
                                "be split onto the model's modules")
    pieces = target.pieces(rows, own_in if own_in is not None else hidden)
    if isinstance(pieces, str):
        raise InvalidLora(path, f"layer {module}: cannot split it onto {', '.join(target.targets)}: {pieces}")
    return split_rows(adapter, tuple((f"{component}.{t}", p) for t, p in pieces), rows), rest


def _hidden_width(layers: dict[str, Adapter], family: Family) -> int | None:
    """The input width most of the file's layers have (FLUX: the hidden width every block layer reads), else the
    output width of a layer that writes the hidden state (a file of OFT layers shows no input width)."""
    counts = Counter(w for a in layers.values() if (w := a.widths()[1]) is not None)
    if not counts:
        counts = Counter(w for p, a in layers.items() if p.endswith(family.hidden_outputs)
                         and (w := a.widths()[0]) is not None)
    return counts.most_common(1)[0][0] if counts else None
