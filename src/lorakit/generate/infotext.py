"""A1111-style generation parameters ("infotext"), written into PNGs as the ``parameters`` text chunk."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from .init_image import describe


def infotext(prompt: str, negative: str, params: dict[str, Any], lora_hashes: dict[str, str]) -> str:
    """``prompt\\nNegative prompt: …\\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, …``."""
    fields = dict(params)
    if lora_hashes:
        fields["Lora hashes"] = '"' + ", ".join(f"{n}: {h}" for n, h in lora_hashes.items()) + '"'
    fields["Version"] = f"lorakit {__version__}"
    line = ", ".join(f"{k}: {_fmt(v)}" for k, v in fields.items() if v is not None)
    neg = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{neg}\n{line}"


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def save_png(image: Any, path: str | Path, text: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    image.save(str(path), format="PNG", pnginfo=info)  # PNG whatever the name ends in (PIL refused ".safetensors")


def job_infotext(job: Any, model: Any, seed: int, lora_hashes: dict[str, str],
                 extra: dict[str, Any] | None = None) -> str:
    """The infotext of one image of a ``Job`` on ``model`` (a ``BaseModel``); ``extra``: the family's own fields
    (FLUX: ``Distilled CFG Scale``, after ``CFG scale`` as Forge writes it)."""
    s, req = job.settings, job.request
    params = {"Steps": s.steps, "Sampler": s.sampler, "CFG scale": s.cfg, **(extra or {}), "Seed": seed,
              "Size": f"{job.width}x{job.height}", "Model hash": model.hash, "Model": model.name,
              "Clip skip": s.clip_skip if s.clip_skip > 1 else None}
    if req.init is not None:
        params.update(describe(req.init))
    return infotext(job.prompt, req.negative, params, lora_hashes)
