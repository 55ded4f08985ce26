"""Where a model runs: the device and dtype behind ``auto``/``cuda:1``/``bf16``, the memory modes, and what this
machine has.

``auto`` device: CUDA if available, else Apple MPS, else the CPU. ``auto`` dtype: fp16 on CUDA/MPS (what A1111,
ComfyUI, InvokeAI and diffusers run), fp32 on the CPU (half-precision matmuls there are ~50× slower than fp32).
"""
from __future__ import annotations

import ctypes
import gc
import re
import sys

import torch

from ..errors import DeviceError
from ..settings import ORIGINALS, VRAM_MODES

__all__ = ["ORIGINALS", "VRAM_MODES", "available_devices", "resolve_device", "resolve_dtype"]

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
TILE_FROM = 1536  # px: larger images decode in VAE tiles in the normal mode (a 2048² decode needs ~10 GiB in fp16)
_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """``cpu`` and every accelerator torch can use here, e.g. ``["cuda:0", "cuda:1", "cpu"]``."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return found + (["mps"] if mps_available() else []) + ["cpu"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None`` → CUDA, else MPS, else CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` → that device, which
    must exist here (else a one-line ``DeviceError`` that lists what does)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    match = _DEVICE.match(name)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {spec!r}: use {', '.join(DEVICE_CHOICES)}")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    present = torch.cuda.is_available() and (index is None or int(index) < torch.cuda.device_count()) \
        if kind == "cuda" else mps_available()
    if not present:
        raise DeviceError(f"device {name} is not available on this machine; available: "
                          f"{', '.join(available_devices())} (torch {torch.__version__})")
    return torch.device(name)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, half: torch.dtype = torch.float16) -> torch.dtype:
    """``auto``/``None`` → ``half`` (fp16; bf16 for models that overflow fp16, as FLUX.1) on CUDA/MPS, fp32 on the
    CPU; ``fp16``/``bf16``/``fp32`` (or ``float16``…)."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DeviceError(f"dtype {spec} is not supported: use {', '.join(DTYPES)}")
        return spec
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return half if device.type in ("cuda", "mps") else torch.float32
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {spec!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``fp16``."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def check_choice(value: str | None, choices: tuple[str, ...], what: str, default: str) -> str:
    """``value`` (lower-cased) when it is one of ``choices``; ``None`` → ``default``; else a ``DeviceError``."""
    name = (value or default).strip().lower()
    if name not in choices:
        raise DeviceError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return name


def free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (``torch.cuda.mem_get_info``); ``None`` where that is not known (CPU: the
    weights live in host memory anyway; MPS: memory is unified)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def total_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[1])


def release_freed_memory(device: torch.device) -> None:
    """Hand back memory a large one-off job has freed (training: the VAE encoding every image once), so the job's
    peak is not carried into what follows: CUDA's cached blocks, and on Linux the C heap's free pages (glibc keeps
    them otherwise: ~130 MiB of RSS after encoding two 512-px images for SD1.5 on the CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, …): nothing to hand back this way
            pass
