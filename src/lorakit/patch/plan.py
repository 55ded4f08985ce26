"""Resolve a list of (LoraModel, Weight) onto a model, check everything, and say what will change.

Every check happens here, before any weight is touched: architecture, module existence, shapes (each adapter's
full ``shape_error`` contract, which guarantees its ΔW can be computed and is no larger than the weight), weight
specs.
"""
from __future__ import annotations

import re
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..adapters import Adapter, Rows
from ..adapters.rows import Originals
from ..errors import IncompatibleLora, UnmatchedKeys, WeightSpecError
from ..keymap.arch import NAMES
from ..lora_model import LoraModel
from ..keymap.families import family_of_model, fits
from ..quant.layers import is_quantized, weight_shape, weight_values
from .expand import Expansions, needed, padded
from .targets import find_module, model_arch, supported
from .weights import Weight

ParamKey = tuple[str, str]  # (canonical module path, "weight" | "bias")


@dataclass(frozen=True)
class Contribution:
    adapter: Adapter
    strength: float
    dyn: int | None


@dataclass
class LoraReport:
    """What one LoRA did to a model: one readable line via ``line()``."""

    name: str
    path: str | None
    types: list[str]
    arch: str
    weight: str = ""
    patched: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    note: str = ""  # how the LoRA was taken (keys that fit this model's family as well as its own)
    leftover_keys: int = 0

    def line(self) -> str:
        parts = ", ".join(f"{c} {n}" for c, n in sorted(self.patched.items())) or "nothing"
        where = f" ({self.path})" if self.path else ""
        text = f"LoRA {self.name}{where}: {'/'.join(self.types)}, {self.arch}; {self.weight}; patched {parts}"
        if self.unmatched:
            text += f"; {len(self.unmatched)} layers not in this model, not applied: {compact_paths(self.unmatched)}"
        if self.leftover_keys:
            text += f"; {self.leftover_keys} keys not understood"
        return text + (f"; {self.note}" if self.note else "")


def compact_paths(paths: Sequence[str]) -> str:
    """Every path, block indices folded: ``transformer.transformer_blocks.{0-18}.norm1.linear, …``."""
    groups: dict[str, list[int]] = {}
    for path in paths:
        m = _INDEX.search(path)
        template, index = (path, -1) if m is None else (path[:m.start(1)] + "{}" + path[m.end(1):], int(m[1]))
        groups.setdefault(template, []).append(index)
    return ", ".join(t if t.find("{}") < 0 else t.replace("{}", "{" + _ranges(sorted(set(ix))) + "}")
                     for t, ix in groups.items())


_INDEX = re.compile(r"\.(\d+)\.")


def _ranges(ix: list[int]) -> str:
    out: list[str] = []
    for i in ix:
        if out and i == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


Entries = dict[ParamKey, list[tuple[Contribution, str]]]
Signature = tuple[tuple[object, float, int | None, str], ...]  # what a parameter's patched value depends on


@dataclass
class Plan:
    """``quantized``: the modules whose stored weight is quantized (GGUF, fp8) — never fused into: their parameter
    entries are left out, ``patch/quantized.py`` merges their contributions per forward."""

    modules: dict[str, torch.nn.Module]
    layers: dict[str, list[Contribution]]
    reports: list[LoraReport]
    quantized: frozenset[str] = frozenset()
    expansions: Expansions = field(default_factory=dict)  # layers widened for a control LoRA: path → inputs
    _entries: Entries | None = field(default=None, repr=False)
    _signatures: dict[ParamKey, Signature] | None = field(default=None, repr=False)

    def param_entries(self) -> Entries:
        """Per parameter: the contributions and which tensor of theirs (``weight`` or ``bias``) applies (worked
        out once per plan: a ``Patcher`` reuses the plan of a set it switches back to)."""
        if self._entries is None:
            self._entries = self._work_out_entries()
        return self._entries

    def signatures(self) -> dict[ParamKey, Signature]:
        """Per parameter: the (adapter, strength, dyn, which) of each contribution — equal signatures, equal
        patched values."""
        if self._signatures is None:
            self._signatures = {key: tuple((c.adapter, c.strength, c.dyn, which) for c, which in contribs)
                                for key, contribs in self.param_entries().items()}
        return self._signatures

    def _work_out_entries(self) -> Entries:
        out: Entries = {}
        for path, contribs in self.layers.items():
            if path in self.quantized:
                continue
            has_bias = getattr(self.modules[path], "bias", None) is not None
            for c in contribs:
                out.setdefault((path, "weight"), []).append((c, "weight"))
                if has_bias and c.adapter.changes_bias and c.adapter.bias_delta(1.0) is not None:
                    out.setdefault((path, "bias"), []).append((c, "bias"))
        return out


# Per LoRA layer: its module (None: not in this model) and the reason it does not fit ("" when it does).
Resolution = list[tuple[str, Adapter, torch.nn.Module | None, str]]
Found = list[tuple[torch.nn.Module | None, str]]  # a Resolution without its adapters, in the LoRA's layer order
RESOLVED_KEEP = 64  # LoRAs whose resolution a Patcher remembers (a switch then skips every module lookup)


class ResolutionCache:
    """LoRA → its layers resolved on one model. Holds the LoRA weakly and none of its tensors: a placed LoRA's
    factors (on the GPU) go when the placement cache lets them go, not when 64 other LoRAs have been seen."""

    def __init__(self) -> None:
        self._items: OrderedDict[int, tuple[weakref.ref[LoraModel], Found]] = OrderedDict()

    def get(self, components: Mapping[str, torch.nn.Module], lora: LoraModel) -> Resolution:
        hit = self._items.get(id(lora))
        if hit is not None and hit[0]() is lora:
            self._items.move_to_end(id(lora))
            return [(path, adapter, module, problem)
                    for (path, adapter), (module, problem) in zip(lora.layers.items(), hit[1])]
        resolution = resolve(components, lora)
        self._items[id(lora)] = (weakref.ref(lora), [(module, problem) for _, _, module, problem in resolution])
        while len(self._items) > RESOLVED_KEEP:
            self._items.popitem(last=False)
        return resolution


PLANS_KEEP = 4  # sets whose plan a Patcher remembers (their LoRAs, factors included, stay alive with it)


class PlanCache:
    """Recent sets → their plan, keyed by the (placed) LoRA objects and their weights; the LoRAs are held, so
    their ids cannot be reused. A server switching between a few sets then builds each plan once. ``Patcher``
    clears it on ``restore``."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[object, ...], tuple[list[LoraModel], Plan]] = OrderedDict()

    @staticmethod
    def _key(loras: Sequence[tuple[LoraModel, Weight]], strict: bool) -> tuple[object, ...]:
        return (strict, *((id(lora), w.unet, w.te, tuple(sorted(w.blocks.items())), w.dyn, w.vector)
                          for lora, w in loras))

    def clear(self) -> None:
        self._items.clear()

    def get(self, loras: Sequence[tuple[LoraModel, Weight]], strict: bool) -> Plan | None:
        key = self._key(loras, strict)
        hit = self._items.get(key)
        if hit is None:
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, loras: Sequence[tuple[LoraModel, Weight]], strict: bool, plan: Plan) -> Plan:
        self._items[self._key(loras, strict)] = ([lora for lora, _ in loras], plan)
        while len(self._items) > PLANS_KEEP:
            self._items.popitem(last=False)
        return plan


def resolve(components: Mapping[str, torch.nn.Module], lora: LoraModel) -> Resolution:
    """Each layer's module (``None``: not in this model) and what does not fit it. A LoRA of a family the model's
    takes (``Family.fits``) names its components as its own family does: they are renamed to the model's
    (``Family.fitted_components``: FLUX.1's T5 is Chroma's ``text_encoder``)."""
    out: Resolution = []
    family = family_of_model(components)
    rename = family.fitted_components if family is not None and lora.arch in family.fits else {}
    for path, adapter in lora.layers.items():
        component, _, rest = path.partition(".")
        if component in rename:
            path = f"{rename[component]}.{rest}"
        module = find_module(components, path)
        if module is None or not supported(module):
            out.append((path, adapter, None, ""))
            continue
        shape = weight_shape(module)  # a norm layer without affine parameters has none; GGUF: logical, not bytes
        problem = adapter.shape_error(shape) if shape is not None else "it has no weight"
        out.append((path, adapter, module, problem or ""))
    return out


MAX_SCALE = 1e30  # |weight × α/r| of a layer: fp32 holds 3.4e38, and ΔW's own values multiply it further


def build_plan(components: Mapping[str, torch.nn.Module], loras: Sequence[tuple[LoraModel, Weight]],
               strict: bool = False, cache: ResolutionCache | None = None,
               originals: Originals | None = None) -> Plan:
    """``originals``: a module's original weight by canonical path (the patcher's kept originals; default: the
    modules' weights as they are), for parts of fused layers whose change reads the whole fused weight. A layer the
    family lets widen (FLUX's ``x_embedder``) takes a control LoRA's wider input: ``Plan.expansions``."""
    arch = model_arch(components)
    originals = originals or _current_weights(components)
    family = family_of_model(components)
    resolved = [(lora, weight, cache.get(components, lora) if cache else resolve(components, lora))
                for lora, weight in loras]
    expansions = _expansions(resolved, family.expandable if family else {})
    modules: dict[str, torch.nn.Module] = {}
    layers: dict[str, list[Contribution]] = {}
    reports = []
    for lora, weight, resolution in resolved:
        _check_arch(lora, arch)
        report = LoraReport(lora.name, lora.path, lora.network_types, lora.arch, weight.describe(_parts(lora)),
                            leftover_keys=len(lora.leftovers))
        if not fits(lora.arch, arch):  # _check_arch let it through: its keys fit this model's family too
            report.note = f"its keys fit {_name(lora.arch)} and {_name(arch)}, no metadata says which: applied as " \
                          f"{_name(arch)}"
        errors: list[str] = []
        for path, adapter, module, problem in resolution:
            if module is None:
                report.unmatched.append(path)
                continue
            if path in expansions:
                problem = ""  # checked against the widened shape in _expansions
                if (adapter.widths()[1] or 0) < expansions[path]:
                    adapter = padded(adapter, expansions[path], path)
            if problem:
                errors.append(f"{path}: {problem}")
                continue
            strength = weight.for_path(path, arch)
            if not abs(strength * adapter.scale()) <= MAX_SCALE:  # NaN too (an infinite weight × a scale of 0)
                raise WeightSpecError(f"{lora.path or lora.name}: weight {strength:g} × its scale {adapter.scale():g} "
                                      f"on {path} is beyond {MAX_SCALE:g} (fp32 arithmetic overflows); nothing was "
                                      "changed")
            modules[path] = module
            report.patched[path.split(".", 1)[0]] = report.patched.get(path.split(".", 1)[0], 0) + 1
            if strength != 0.0:
                if isinstance(adapter, Rows) and adapter.needs_weight:
                    adapter = adapter.bind(originals)
                layers.setdefault(path, []).append(Contribution(adapter, strength, weight.dyn))
        _raise_if_bad(lora, arch, errors, report, strict)
        reports.append(report)
    return Plan(modules, layers, reports, frozenset(p for p, m in modules.items() if is_quantized(m)), expansions)


def _expansions(resolved: list[tuple[LoraModel, Weight, Resolution]], expandable: Mapping[str, str]) -> Expansions:
    """The layers a control LoRA of the set needs widened, each to one width (its shape checked at that width)."""
    out: Expansions = {}
    for lora, _, resolution in resolved:
        for path, adapter, module, problem in resolution:
            shape = weight_shape(module) if module is not None and problem else None
            width = needed(path, adapter, shape, expandable) if shape is not None else None
            if width is None:
                continue
            if out.get(path, width) != width:
                raise IncompatibleLora(f"{lora.path or lora.name}: {path} needs {width} inputs, another control LoRA "
                                       f"of the set {out[path]}")
            if adapter.shape_error((shape[0], width)) is None:  # type: ignore[index]
                out[path] = width
    return out


def _current_weights(components: Mapping[str, torch.nn.Module]) -> Originals:
    def weight(path: str) -> torch.Tensor:
        module = find_module(components, path)
        if module is None or weight_shape(module) is None:
            raise IncompatibleLora(f"{path}: a part of a fused layer the LoRA changes is not in this model")
        return weight_values(module)
    return weight


def _parts(lora: LoraModel) -> set[str]:
    """The weight parts a LoRA has: ``te`` (any text encoder) and/or ``unet``."""
    return {"te" if c.startswith("text_encoder") else "unet" for c in lora.modules_per_component()}


def _check_arch(lora: LoraModel, arch: str) -> None:
    if fits(lora.arch, arch) or arch in lora.also_fits:  # the same architecture, an unknown one, one the model's
        return  # family takes, or one the keys fit as well (no metadata saying which)
    where = lora.path or lora.name
    raise IncompatibleLora(f"{where}: this LoRA is for {_name(lora.arch)}, the model is {_name(arch)}; "
                           "nothing was changed")


def _name(arch: str) -> str:
    """The architecture's display name (``arch`` itself when it has none)."""
    return next((name for a, name in NAMES.items() if a == arch), arch)


def _raise_if_bad(lora: LoraModel, arch: str, errors: list[str], report: LoraReport, strict: bool) -> None:
    where = lora.path or lora.name
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise IncompatibleLora(f"{where}: {len(errors)} layers do not fit the model ({_name(arch)}): "
                               f"{'; '.join(errors[:3])}{more}; nothing was changed")
    if report.patched == {} and lora.layers:
        raise IncompatibleLora(f"{where}: none of its {len(lora.layers)} layers exists in this model "
                               f"(e.g. {next(iter(lora.layers))}); nothing was changed")
    if strict and (report.unmatched or lora.leftovers):
        items = report.unmatched + lora.leftovers
        raise UnmatchedKeys(lora.path, f"{len(items)} entries not applied (strict mode): {', '.join(items[:5])}")

