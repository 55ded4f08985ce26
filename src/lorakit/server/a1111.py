"""AUTOMATIC1111's ``/sdapi/v1`` request and response shapes, for what a LoRA user needs.

Field names and types are A1111's; fields lorakit does not use (hires fix, scripts, restore_faces, …) are
accepted and ignored, as A1111 ignores what it does not know. Differences, by choice: ``steps``, ``cfg_scale`` and
``sampler_name`` left out mean lorakit's defaults (20, 7, Euler a) — or what an LCM/Turbo LoRA in the prompt needs.
"""
from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..generate.pipeline import LIMITS, Request, Result
from ..generate.samplers import SAMPLERS

MAX_IMAGES = 16  # batch_size × n_iter per request


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's old name for sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=LIMITS["batch"][1])
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    steps: int | None = Field(None, ge=LIMITS["steps"][0], le=LIMITS["steps"][1])
    cfg_scale: float | None = Field(None, ge=LIMITS["cfg"][0], le=LIMITS["cfg"][1])
    width: int = Field(512, ge=LIMITS["width"][0], le=LIMITS["width"][1], multiple_of=8)
    height: int = Field(512, ge=LIMITS["height"][0], le=LIMITS["height"][1], multiple_of=8)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    # lorakit's own: add the LoRAs' declared trigger words the prompt lacks
    lorakit_auto_trigger_words: bool = False


def sampler_of(req: Txt2Img) -> str | None:
    """A1111 1.9+ sends the schedule apart (``sampler_name="DPM++ 2M", scheduler="Karras"``)."""
    name = req.sampler_name or req.sampler_index
    if name and (req.scheduler or "").lower() == "karras" and f"{name} Karras" in SAMPLERS:
        return f"{name} Karras"
    return name


def requests_of(req: Txt2Img, clip_skip: int | None, auto_triggers: bool) -> list[Request]:
    """One ``Request`` per iteration; image i of the whole job has seed ``seed + i`` (A1111's numbering)."""
    seed = req.seed if req.seed >= 0 else random.randrange(2 ** 32 - MAX_IMAGES)
    skip = req.override_settings.get("CLIP_stop_at_last_layers", clip_skip)
    return [Request(req.prompt, req.negative_prompt, req.steps, req.cfg_scale, sampler_of(req),
                    seed + k * req.batch_size, req.width, req.height, req.batch_size,
                    int(skip) if skip else None, auto_triggers or req.lorakit_auto_trigger_words)
            for k in range(req.n_iter)]


def png_base64(image: Any, text: str) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response(req: Txt2Img, results: list[Result], model_name: str, model_hash: str, stamp: str) -> dict[str, Any]:
    """``{"images": [base64 PNG], "parameters": the request, "info": JSON text}`` as A1111 returns them."""
    images = [png_base64(im, t) for r in results for im, t in zip(r.images, r.infotexts)] if req.send_images else []
    first = results[0]
    seeds = [s for r in results for s in r.seeds]
    texts = [t for r in results for t in r.infotexts]
    info = {
        "prompt": first.prompt, "all_prompts": [r.prompt for r in results for _ in r.seeds],
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": req.width, "height": req.height,
        "sampler_name": first.settings.get("sampler"), "cfg_scale": first.settings.get("cfg"),
        "steps": first.settings.get("steps"), "batch_size": req.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": None, "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts,
        "styles": req.styles, "job_timestamp": stamp, "clip_skip": first.settings.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False, "version": f"lorakit {__version__}",
        "notes": [n for r in results for n in r.notes],
    }
    return {"images": images, "parameters": req.model_dump(), "info": json.dumps(info)}


def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [cls], "options": dict(extra)} for name, (cls, extra) in SAMPLERS.items()]


def progress(snap: Any) -> dict[str, Any]:
    fraction = snap.step / snap.steps if snap.steps and snap.started else 0.0
    import time

    elapsed = time.time() - snap.started if snap.started else 0.0
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    return {"progress": fraction, "eta_relative": eta,
            "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                      "job": f"lorakit txt2img {snap.job_no}" if snap.started else "", "job_count": snap.job_count,
                      "job_timestamp": snap.job_timestamp, "job_no": snap.job_no, "sampling_step": snap.step,
                      "sampling_steps": snap.steps},
            "current_image": None, "textinfo": None}
