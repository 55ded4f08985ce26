"""The LoRAs of a family with an original layout (FLUX.1's BFL, SD3's SAI: ``Family.layout``) as the tools write
them: the original layout of kohya and ComfyUI files, or the diffusers layout of PEFT/diffusers files, from the
layers lorakit holds per model module. Every function takes the family (default FLUX.1, where this began).

- ``original_layout``: canonical groups (model paths, BFL paths or both) → BFL paths wherever the layer has one:
  a plain rename (``to_out.0`` → ``img_attn.proj``), or the parts of a fused layer fused back (``flux_fuse``).
  Parts that do not fuse (not every part there, not plain LoRA, scales that differ) keep their diffusers names —
  kohya files then carry them as OneTrainer does (``lora_transformer_…``), which ComfyUI, Forge, InvokeAI and
  lorakit read — and are listed with the reason.
- ``file_groups``: a loaded file's layers in the original layout (``layout.file_layout``: a fused layer read from
  the file is its one adapter again, its tensors as read), for ``convert``.
- ``model_groups``: a loaded file's layers in the diffusers layout, for PEFT. A part of a fused layer is a PEFT
  LoRA only when the type splits into per-part LoRAs (LoRA: shared down, rows of up; DoRA per output); a LoKr,
  LoHa, full … on a fused ``qkv`` changes its parts' rows together and has no diffusers form; a block-diagonal
  fused LoRA (kohya ``split_qkv``) is made compact again, part by part.
"""
from __future__ import annotations

from torch import Tensor

from ..adapters import Adapter, Rows, kind_of
from ..formats.base import Grouped
from ..formats.writers import exact_alphas, peft_problem
from ..keymap.families import FLUX1, Family
from ..keymap.layouts import Fused, LayoutMap
from ..layout import file_layout, origin_of
from ..lora_model import LoraModel
from .flux_fuse import compact, fuse_parts
from .layers import leaves_of
from .report import ToolReport

Problem = tuple[str, str]  # (what, why)


def _layout(family: Family) -> LayoutMap:
    assert family.layout is not None, f"{family.display} has no original layout"
    return family.layout


def original_layout(groups: Grouped, family: Family = FLUX1) -> tuple[Grouped, list[Problem]]:
    """``groups`` in the original layout where each layer has one; the fused layers whose parts keep diffusers
    names."""
    out: Grouped = {}
    homes: dict[str, tuple[Fused, dict[int, str]]] = {}
    layout, denoiser = _layout(family), family.denoiser
    for path, leaves in groups.items():
        component, _, module = path.partition(".")
        if component != denoiser or layout.is_original(module):
            out[path] = leaves
        elif (plain := layout.to_original(module)) is not None:
            out[f"{denoiser}.{plain}"] = leaves
        elif (home := layout.fused_home(module)) is not None:
            bfl, fused, index = home
            homes.setdefault(bfl, (fused, {}))[1][index] = path
        else:
            out[path] = leaves
    kept: list[Problem] = []
    for bfl, (fused, parts) in sorted(homes.items()):
        target = f"{denoiser}.{bfl}"
        have = [parts[i] for i in sorted(parts)]
        fused_leaves: dict[str, Tensor] | None = None
        if len(parts) < len(fused.targets):
            names = ", ".join(t.rsplit(".", 1)[-1] for i, t in enumerate(fused.targets) if i not in parts)
            why = f"no {names} here (a fused layer needs every part)"
        elif target in out:
            why = "the fused layer is given too"
        else:
            fused_leaves, why = fuse_parts([groups[p] for p in have], _swapped(fused, [groups[p] for p in have]))
        if fused_leaves is None:
            out.update({p: groups[p] for p in have})
            names = ", ".join(p.rsplit(".", 1)[-1] for p in have)
            kept.append((target, f"written as its parts ({names}) under diffusers names: {why}"))
        else:
            out[target] = fused_leaves
    return out, kept


def _swapped(fused: Fused, parts: list[dict[str, Tensor]]) -> bool:
    """Whether the fused layer's halves are swapped: always (FLUX.1's final adaLN), or by its rows and input width
    (SD3's context adaLN: only the last block's, 2·h rows)."""
    if not fused.swap_only:
        return fused.swap
    up, down = (p.get("lora_up.weight") for p in parts), (p.get("lora_down.weight") for p in parts)
    ups, downs = [u for u in up if u is not None], [d for d in down if d is not None]
    if len(ups) != len(parts) or not downs:
        return False  # not a LoRA: fuse_parts says why it does not fuse
    return fused.swapped(sum(int(u.shape[0]) for u in ups), int(downs[0].shape[1]))


def noted_layout(groups: Grouped, report: ToolReport, family: Family = FLUX1) -> Grouped:
    """``original_layout`` of a tool's result, the fused layers kept as parts noted in ``report``."""
    out, kept = original_layout(groups, family)
    report.notes += [f"{what}: {why}" for what, why in kept]
    return out


def file_groups(lora: LoraModel, *, partial_names: bool, family: Family = FLUX1) -> tuple[Grouped, list[Problem]]:
    """The file's layers in the original layout, tensors as read (``partial_names``: a name such as XLabs'
    ``linear1_qkv``, some rows of a BFL layer, may stay — ComfyUI reads it; kohya readers do not, so without it the
    layer goes back to its parts); what cannot be written."""
    layers = file_layout(lora.layers)
    origins = {o.module: o for a in lora.layers.values() if (o := origin_of(a)) is not None}
    for path in [p for p in layers if _partial(p, family) and not partial_names]:
        del layers[path]
        layers.update({p: lora.layers[p] for p in origins[path].parts})
    problems = [(p, f"a {kind_of(a)} change of some rows of a fused layer has no kohya name") for p, a in
                layers.items() if isinstance(a, Rows)]
    groups = {p: leaves_of(a) for p, a in layers.items() if not isinstance(a, Rows)}
    return (exact_alphas(groups, lora.metadata) if lora.dialect == "peft" else groups), problems


def _partial(path: str, family: Family) -> bool:
    component, _, module = path.partition(".")
    layout = _layout(family)
    return component == family.denoiser and layout.is_original(module) and not layout.is_written(module)


def model_groups(lora: LoraModel) -> tuple[Grouped, list[Problem]]:
    """The layers per model module (diffusers names) as PEFT holds them; the fused layers it cannot hold."""
    groups: Grouped = {}
    problems: dict[str, str] = {}
    for path, adapter in lora.layers.items():
        origin = origin_of(adapter)
        if origin is None or origin.module in problems:
            groups[path] = leaves_of(adapter)  # a layer of its own: convert names what PEFT cannot hold
        elif isinstance(adapter, Rows) or peft_problem(path, leaves_of(adapter)):
            problems[origin.module] = _why_not_peft(adapter, origin.parts)
        else:
            groups[path] = leaves_of(adapter)
    groups = {p: g for p, g in groups.items() if (o := origin_of(lora.layers[p])) is None or o.module not in problems}
    if lora.dialect == "peft":
        groups = exact_alphas(groups, lora.metadata)
    for origin in {id(o): o for a in lora.layers.values() if (o := origin_of(a)) is not None}.values():
        if all(p in groups for p in origin.parts):
            small = compact([groups[p] for p in origin.parts])
            groups.update(dict(zip(origin.parts, small or ())))
    return groups, sorted(problems.items())


def _why_not_peft(adapter: Adapter, parts: tuple[str, ...]) -> str:
    names = ", ".join(p.rsplit(".", 1)[-1] for p in parts)
    kind = kind_of(adapter)
    if kind.startswith("dora") and isinstance(adapter, Rows):
        detail = f"a per-input DoRA magnitude normalises each column over every row of the fused layer ({names})"
    else:
        detail = f"a {kind} change of the fused layer is no LoRA on each of its parts ({names})"
    return (f"{detail}; diffusers/PEFT files hold one LoRA (or per-output DoRA) per module — write it --to kohya "
            "or comfy, or make it a LoRA with `lorakit resize` / `merge --method svd` first")


def convert_groups(lora: LoraModel, target: str, family: Family = FLUX1
                   ) -> tuple[Grouped, list[Problem], list[Problem]]:
    """A file's layers for ``convert --to target``: (groups, fused layers kept as parts (noted), what the target
    cannot hold)."""
    if target in ("peft", "diffusers"):
        groups, problems = model_groups(lora)
        return groups, [], problems
    groups, problems = file_groups(lora, partial_names=target == "comfy", family=family)
    groups, kept = original_layout(groups, family)
    return groups, kept, problems
