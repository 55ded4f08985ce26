"""A1111 sampler names → diffusers schedulers with Stable Diffusion's training noise schedule."""
from __future__ import annotations

from typing import Any

from ..errors import LorakitError

SD_SCHEDULE: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
}


def sampler_name(name: str) -> str:
    """The canonical spelling of a sampler name (case and ``_``/space insensitive)."""
    key = name.strip().lower().replace("_", " ")
    for known in SAMPLERS:
        if known.lower() == key:
            return known
    raise LorakitError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def scheduler_for(name: str, prediction_type: str = "epsilon") -> Any:
    import diffusers

    cls_name, extra = SAMPLERS[sampler_name(name)]
    return getattr(diffusers, cls_name)(**SD_SCHEDULE, **extra, prediction_type=prediction_type)
