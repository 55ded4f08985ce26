"""LoRA factors on the device of the weights they patch, converted once per (LoRA, device, compute dtype).

The compute dtype is fp32: every adapter does its math in fp32 (fused sums are fp32 and cast once), and fp32
holds fp16/bf16/fp32 files exactly, so one converted copy serves fp16, bf16 and fp32 models alike and a switch
never re-converts. Scalars (``alpha``, ``scale``, 0-d tensors) stay on the CPU: reading them is then no device
sync. The converted copies live in a small cache keyed weakly by the ``LoraModel``: an entry goes when its LoRA is
collected, and at most ``CACHE_SIZE`` are kept (least recently used first out), so a server that sees many LoRAs
does not fill the GPU with factors — or as many as one mixed-LoRA batch uses (``reserve``), so that a batch of 16
LoRA sets does not evict its own factors and move them again for every batch.
"""
from __future__ import annotations

import copy
import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from ..adapters import Adapter
from ..lora_model import LoraModel
from ..models.host_memory import host_copies

COMPUTE_DTYPE = torch.float32
CACHE_SIZE = 8
SCALAR_KEYS = ("alpha", "scale")
W = TypeVar("W")
Placement = tuple[tuple[str, str], ...]  # ((component, device), ...)
CacheKey = tuple[int, Placement, torch.dtype, bool]  # (id of the LoRA, placement, dtype, pinned)
_CACHE: OrderedDict[CacheKey, LoraModel] = OrderedDict()
_FINALIZERS: dict[int, weakref.finalize[[int], LoraModel]] = {}
_capacity = CACHE_SIZE


def reserve(loras: int) -> None:
    """Keep at least ``loras`` placed LoRAs from now on (the cache only grows: a server's largest batch)."""
    global _capacity
    _capacity = max(_capacity, loras)


def capacity() -> int:
    return _capacity


def run_device(module: torch.nn.Module, mode: str) -> torch.device:
    """Where ``module``'s LoRA math runs: beside its weights (fused), or where its forward runs (hooks; under
    diffusers' model CPU offload the weights wait on the CPU and accelerate moves them to the execution device)."""
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if mode == "hooks" and execution is not None:
        return torch.device(execution)
    # The first weight that holds values: a model built on ``meta`` with some parts materialised (tests, lazy
    # loading) runs its LoRA math where those parts are.
    param = next((p for p in module.parameters() if p.device.type != "meta"), None)
    return param.device if param is not None else torch.device("cpu")


def place_loras(pairs: Sequence[tuple[LoraModel, W]], components: Mapping[str, torch.nn.Module],
                mode: str = "fused", host: bool = False) -> list[tuple[LoraModel, W]]:
    """``pairs`` with every LoRA's factors on the device its layers run on (see ``run_device``); with ``host``
    (fused, originals kept on the host: the low-memory choice) in host memory instead, each layer's factors then
    moved to the device only while its sum is made (``on_device``), so none stay on the card. Host-placed
    factors are pinned when the model runs on CUDA: a copy from pageable memory would wait for the stream at every
    layer of a switch, one from pinned memory is queued like the sums."""
    runs = {name: run_device(m, mode) for name, m in components.items()}
    devices = {name: torch.device("cpu") for name in runs} if host else runs
    pin = host and any(d.type == "cuda" for d in runs.values())
    return [(lora_on(lora, devices, pin=pin), w) for lora, w in pairs]


def on_device(adapter: Adapter, device: torch.device) -> Adapter:
    """``adapter`` itself when its tensors are on ``device``, else a transient copy there (host-placed factors
    of a fused sum)."""
    if all(_keeps(k, t) or t.device == device for k, t in _tensors(adapter)):
        return adapter
    return adapter_on(adapter, device)


def lora_on(lora: LoraModel, devices: Mapping[str, torch.device], dtype: torch.dtype = COMPUTE_DTYPE,
            pin: bool = False) -> LoraModel:
    """``lora`` with each layer's tensors on ``devices[component]`` in ``dtype`` (cached); ``lora`` itself when
    nothing would change (an fp32 LoRA on the CPU). ``pin``: tensors placed on the CPU go to pinned memory."""
    placement: Placement = tuple(sorted((c, str(d)) for c, d in devices.items()))
    key = (id(lora), placement, dtype, pin)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    if not any(_needs_move(t, devices.get(p.split(".", 1)[0]), dtype, k, pin) for p, a in lora.layers.items()
               for k, t in _tensors(a)):
        return lora
    layers = {}
    for path, a in lora.layers.items():
        device = devices.get(path.split(".", 1)[0], torch.device("cpu"))
        pinned = pin and device.type == "cpu"  # cast straight into pinned memory below, not copied twice
        layers[path] = _map_tensors(a, lambda k, t: t) if pinned else adapter_on(a, device, dtype)
    if pin:
        _pin([a for path, a in layers.items() if devices.get(path.split(".", 1)[0], torch.device("cpu")).type
              == "cpu"], dtype)
    placed = dataclasses.replace(lora, layers=layers)
    _remember(lora, key, placed)
    return placed


def adapter_on(adapter: Adapter, device: torch.device, dtype: torch.dtype = COMPUTE_DTYPE) -> Adapter:
    """A shallow copy of ``adapter`` whose tensors (and a wrapped adapter's, as DoRA's) are on ``device``."""
    return _map_tensors(adapter, lambda k, t: _convert(k, t, device, dtype))


def _map_tensors(adapter: Adapter, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Adapter:
    """A shallow copy of ``adapter`` (and of the adapters it wraps) with each tensor ``t`` under key ``k`` replaced
    by ``fn(k, t)``, in new dicts: ``adapter`` itself is left as it is."""
    out = copy.copy(adapter)
    out.t = {k: fn(k, t) for k, t in adapter.t.items()}
    for name, value in vars(adapter).items():
        if isinstance(value, Adapter):
            setattr(out, name, _map_tensors(value, fn))
    return out


def _tensors(adapter: Adapter) -> list[tuple[str, torch.Tensor]]:
    return [(k, t) for a in _with_nested(adapter) for k, t in a.t.items()]


def _with_nested(adapter: Adapter) -> list[Adapter]:
    """``adapter`` and the adapters it wraps (DoRA's), depth first."""
    found = [adapter]
    for value in vars(adapter).values():
        if isinstance(value, Adapter):
            found += _with_nested(value)
    return found


def _keeps(key: str, t: torch.Tensor) -> bool:
    """Scalars and non-float tensors stay as they are (read with ``float()``/``bool()``, never in device math)."""
    return key in SCALAR_KEYS or t.dim() == 0 or not t.is_floating_point()


def _needs_move(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype, key: str, pin: bool) -> bool:
    if _keeps(key, t):
        return False
    device = device or torch.device("cpu")
    return t.dtype != dtype or t.device != device or (pin and device.type == "cpu" and not t.is_pinned())


def _convert(key: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if _keeps(key, t):
        return t
    return t.to(device=device, dtype=dtype, non_blocking=t.is_pinned())


def _pin(adapters: list[Adapter], dtype: torch.dtype) -> None:
    """Give the tensors of freshly copied ``adapters`` (their own ``t`` dicts, nested ones too) pinned host copies
    in ``dtype``, cast while copied and packed in one group (``host_memory``): a LoRA's factors go together."""
    slots = [(a.t, k) for adapter in adapters for a in _with_nested(adapter) for k, t in a.t.items()
             if not _keeps(k, t)]
    for (t, k), pinned in zip(slots, host_copies([t[k] for t, k in slots], dtype=dtype, pin=True)):
        t[k] = pinned


def _remember(lora: LoraModel, key: CacheKey, placed: LoraModel) -> None:
    _CACHE[key] = placed
    lora_id = id(lora)
    if lora_id not in _FINALIZERS:  # the entries go with the LoRA (its id may be reused afterwards)
        _FINALIZERS[lora_id] = weakref.finalize(lora, _forget, lora_id)
    while len(_CACHE) > _capacity:
        _CACHE.popitem(last=False)


def _forget(lora_id: int) -> None:
    _FINALIZERS.pop(lora_id, None)
    for key in [k for k in _CACHE if k[0] == lora_id]:
        del _CACHE[key]


def clear_cache() -> None:
    """Drop every placed copy (their device memory is freed once nothing else holds them)."""
    _CACHE.clear()


def cached_count() -> int:
    """How many converted LoRAs are held (for tests and debug logs)."""
    return len(_CACHE)
