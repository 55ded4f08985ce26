"""AUTOMATIC1111's ``/sdapi/v1`` request and response shapes, for what a LoRA user needs.

Field names and types are A1111's; fields lorakit does not use (hires fix, scripts, restore_faces, …) are
accepted and ignored, as A1111 ignores what it does not know. Differences, by choice: ``steps``, ``cfg_scale`` and
``sampler_name`` left out mean lorakit's defaults (20, 7, Euler a; FLUX.1-dev 28, 1, Euler with ``distilled_cfg_scale``
3.5, schnell 4 steps) — or what an LCM/Turbo LoRA in the prompt needs.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..generate.pipeline import LIMITS, Request, Result
from ..generate.samplers import SAMPLERS
from .images import decode_image

MAX_IMAGES = 16  # batch_size × n_iter per request
MAX_PROMPT_CHARS = 20_000  # ~10× the longest real prompts; a 10M-character one must not hold the only worker
MAX_SEED = 2 ** 64 - 1 - 2 * MAX_IMAGES  # image i of the job gets seed + i, and seeds are 64-bit
MAX_CLIP_SKIP = 12  # A1111's slider; also at most the text encoder's layers
MAX_TASK_ID = 200  # characters of an idempotency key (force_task_id, x-request-id)


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)  # -1: random, as in A1111
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's old name for sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=LIMITS["batch"][1])
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    steps: int | None = Field(None, ge=LIMITS["steps"][0], le=LIMITS["steps"][1])
    cfg_scale: float | None = Field(None, ge=LIMITS["cfg"][0], le=LIMITS["cfg"][1])
    # Forge's name for FLUX.1-dev's distilled guidance (default 3.5; ignored by models without one)
    distilled_cfg_scale: float | None = Field(None, ge=LIMITS["guidance"][0], le=LIMITS["guidance"][1])
    width: int = Field(512, ge=LIMITS["width"][0], le=LIMITS["width"][1], multiple_of=8)
    height: int = Field(512, ge=LIMITS["height"][0], le=LIMITS["height"][1], multiple_of=8)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    # lorakit's own: add the LoRAs' declared trigger words the prompt lacks
    lorakit_auto_trigger_words: bool = False
    # lorakit's own: the control image (base64) of a FLUX.1 control LoRA (Canny edges, a depth map) in the prompt
    lorakit_control_image: str | None = None  # size checked when decoded (images.decode_base64)
    # A1111's own: the job's id (its /internal/progress key); lorakit on Ray Serve: the idempotency key
    force_task_id: str | None = Field(None, min_length=1, max_length=MAX_TASK_ID)


@dataclass(frozen=True)
class Task:
    """A client's idempotency key for one generation request (``force_task_id``, else the ``x-request-id``
    header) and a fingerprint of the body: a retry with the same key gets the first answer, never a second
    image; the same key with another body is a conflict."""

    id: str
    fingerprint: str


def task_of(req: Txt2Img, headers: Mapping[str, str]) -> Task | None:
    """The request's ``Task``, or ``None`` when the client gave no usable key (an ``x-request-id`` longer than
    ``MAX_TASK_ID`` or with control characters is ignored)."""
    key = req.force_task_id or headers.get("x-request-id", "")
    if not key or len(key) > MAX_TASK_ID or not key.isprintable():
        return None
    return Task(key, hashlib.sha256(req.model_dump_json().encode()).hexdigest()[:32])


def sampler_of(req: Txt2Img) -> str | None:
    """A1111 1.9+ sends the schedule apart (``sampler_name="DPM++ 2M", scheduler="Karras"``)."""
    name = req.sampler_name or req.sampler_index
    if name and (req.scheduler or "").lower() == "karras" and f"{name} Karras" in SAMPLERS:
        return f"{name} Karras"
    return name


def requests_of(req: Txt2Img, clip_skip: int, auto_triggers: bool) -> list[Request]:
    """One ``Request`` per iteration; image i of the whole job has seed ``seed + i`` (A1111's numbering)."""
    seed = req.seed if req.seed >= 0 else random.randrange(2 ** 32 - MAX_IMAGES)
    control = decode_image(req.lorakit_control_image, "lorakit_control_image") if req.lorakit_control_image else None
    return [Request(req.prompt, req.negative_prompt, req.steps, req.cfg_scale, sampler_of(req),
                    seed + k * req.batch_size, req.width, req.height, req.batch_size, clip_skip,
                    auto_triggers or req.lorakit_auto_trigger_words, guidance=req.distilled_cfg_scale, control=control)
            for k in range(req.n_iter)]


def checked_options(values: dict[str, Any], clip_layers: int, where: tuple[str, ...]) -> dict[str, Any]:
    """The options among ``values`` that lorakit uses, each checked as A1111's settings page would allow it:
    ``CLIP_stop_at_last_layers`` a whole number from 1 to ``min(12, clip_layers)``, ``lorakit_auto_trigger_words``
    a boolean, ``samples_format`` a string. Other keys are accepted and ignored, as A1111 ignores what it does not
    know. A bad value raises ``RequestValidationError`` (a 422) located at ``where + (key,)``."""
    checks = {"CLIP_stop_at_last_layers": _clip_skip_problem(min(MAX_CLIP_SKIP, clip_layers)),
              "lorakit_auto_trigger_words": lambda v: None if isinstance(v, bool) else "must be true or false",
              "samples_format": lambda v: None if isinstance(v, str) else "must be a string"}
    errors = [{"type": "value_error", "loc": (*where, key), "msg": problem, "input": values[key]}
              for key, check in checks.items() if key in values and (problem := check(values[key]))]
    if errors:
        raise RequestValidationError(errors)
    return {k: values[k] for k in checks if k in values}


def _clip_skip_problem(deepest: int) -> Any:
    def check(value: Any) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= deepest:
            return None
        return f"clip skip must be a whole number from 1 to {deepest} (1 uses the text encoder's last layer)"

    return check


def _extra(settings: dict[str, Any]) -> dict[str, Any]:
    """Forge's extra generation parameters: FLUX.1-dev's ``Distilled CFG Scale``."""
    return {"Distilled CFG Scale": settings["guidance"]} if settings.get("guidance") is not None else {}


def png_base64(image: Any, text: str) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response(req: Txt2Img, results: list[Result], model_name: str, model_hash: str, stamp: str,
             parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"images": [base64 PNG], "parameters": the request (or ``parameters``), "info": JSON text}`` as A1111
    returns them."""
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
        "denoising_strength": getattr(req, "denoising_strength", None),
        "extra_generation_params": _extra(first.settings), "index_of_first_image": 0, "infotexts": texts,
        "styles": req.styles, "job_timestamp": stamp, "clip_skip": first.settings.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False, "version": f"lorakit {__version__}",
        "notes": [n for r in results for n in r.notes],
    }
    return {"images": images, "parameters": req.model_dump() if parameters is None else parameters,
            "info": json.dumps(info)}


def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [cls], "options": dict(extra)} for name, (cls, extra) in SAMPLERS.items()]


def progress(snap: Any) -> dict[str, Any]:
    fraction = snap.step / snap.steps if snap.steps and snap.started else 0.0
    import time

    elapsed = time.time() - snap.started if snap.started else 0.0
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    return {"progress": fraction, "eta_relative": eta,
            "state": {"skipped": snap.stopping == "skip", "interrupted": snap.stopping == "interrupt",
                      "stopping_generation": False,
                      "job": f"lorakit txt2img {snap.job_no}" if snap.started else "", "job_count": snap.job_count,
                      "job_timestamp": snap.job_timestamp, "job_no": snap.job_no, "sampling_step": snap.step,
                      "sampling_steps": snap.steps},
            "current_image": None, "textinfo": None}
