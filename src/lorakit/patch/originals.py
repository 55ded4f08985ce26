"""Where the originals of fused weights are kept: beside the weights on the device, or in host memory.

``device`` costs a second device buffer per touched weight and makes a switch a pure device computation; ``host``
costs no device memory beyond the model (A1111 keeps its backups on the host) and a host→device copy of the
touched weights per switch. ``auto`` keeps them on the device while that leaves ``HEADROOM`` free for sampling
(``torch.cuda.mem_get_info``), the rest on the host; on the CPU and MPS (one memory) ``auto`` is ``device``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

from ..errors import LorakitError
from ..models.device import ORIGINALS, dtype_name, free_bytes, total_bytes

HEADROOM_BYTES = 2 << 30  # at least 2 GiB stay free for activations (an SDXL 1024² step in fp16 needs ~1.5 GiB)
HEADROOM_SHARE = 0.15  # or 15 % of the card, whichever is more
K = TypeVar("K")


def choose_places(params: Mapping[K, torch.Tensor], mode: str) -> dict[K, str]:
    """``"device"`` or ``"host"`` for each parameter about to be patched for the first time."""
    if mode not in ORIGINALS:
        raise LorakitError(f"lora_originals must be one of {', '.join(ORIGINALS)}, got {mode!r}")
    if mode != "auto":
        return {k: mode for k in params}
    budgets: dict[torch.device, int | None] = {}
    places = {}
    for key, p in params.items():
        if p.device not in budgets:
            budgets[p.device] = _budget(p.device)
        budget, size = budgets[p.device], p.numel() * p.element_size()
        if budget is None or size <= budget:
            places[key] = "device"
            budgets[p.device] = None if budget is None else budget - size
        else:
            places[key] = "host"
            budgets[p.device] = 0  # keep the choice simple to read: once full, the rest goes to the host
    return places


def _budget(device: torch.device) -> int | None:
    """Bytes of originals the device can take; ``None``: no limit (memory the weights already share)."""
    free, total = free_bytes(device), total_bytes(device)
    if free is None or total is None:
        return None
    return max(0, free - max(HEADROOM_BYTES, int(total * HEADROOM_SHARE)))


def describe_places(params: Mapping[K, torch.Tensor], places: Mapping[K, str], mode: str) -> str:
    """One debug line: how many originals (and MiB) went where, and why."""
    parts = []
    for where in ("device", "host"):
        chosen = [p for k, p in params.items() if places[k] == where]
        if chosen:
            mib = sum(p.numel() * p.element_size() for p in chosen) / 2 ** 20
            devices = sorted({str(p.device) for p in chosen}) if where == "device" else ["host memory"]
            parts.append(f"{len(chosen)} on {'/'.join(devices)} ({mib:.1f} MiB)")
    dtypes = sorted({dtype_name(p.dtype) for p in params.values()})
    return f"LoRA originals ({mode}, {'/'.join(dtypes)}): {', '.join(parts)}"
