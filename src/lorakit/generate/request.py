"""Request resolution: what the user asked for (``Request``) → what will run (``Job``), checked before any weight
changes — prompt tags parsed, LoRA names resolved and files loaded, settings settled (explicit values, else what an
LCM/Turbo/Hyper LoRA needs, else defaults), limits and clip skip checked, seeds drawn."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import LorakitError
from ..lora_model import LoraModel, load_cached
from ..prompt import LoraRef, parse_prompt
from .fast_loras import SETTINGS, fast_kind
from .init_image import InitImage, steps_run
from .samplers import SAMPLERS, sampler_name

log = logging.getLogger("lorakit")
DEFAULTS: dict[str, Any] = {"steps": 20, "cfg": 7.0, "sampler": "Euler a"}
LIMITS = {"width": (64, 2048), "height": (64, 2048), "steps": (1, 150), "batch": (1, 16), "cfg": (0.0, 30.0),
          "guidance": (0.0, 30.0)}
MAX_SEED = 2 ** 64 - 1


@dataclass(frozen=True)
class Rules:
    """What a model family's requests may ask for: defaults (``steps``, ``cfg``, ``sampler``, and ``guidance``
    where the family has a distilled guidance), its sampler names, whether fast (LCM/Turbo/Hyper) LoRA settings and
    clip skip apply, the step sizes must be multiples of, and the largest width and height the model's positional
    table covers (``None``: no limit of the model's own; SD3's ``pos_embed_max_size``)."""

    defaults: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))
    samplers: tuple[str, ...] = tuple(SAMPLERS)
    fast_loras: bool = True
    clip_skip: bool = True
    size_step: int = 8
    family: str = "Stable Diffusion"
    max_size: int | None = None


SD_RULES = Rules()


@dataclass
class Request:
    """One generation as asked: the prompt with its LoRA tags, and the sampling settings (``None``: default, or
    what a fast LoRA in the prompt needs)."""

    prompt: str
    negative: str = ""
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    seed: int | None = None  # None: random
    width: int | None = None  # None: the model's native size (demo 64, SD1/SD2 512, SDXL 1024)
    height: int | None = None
    batch: int = 1
    clip_skip: int | None = None
    auto_triggers: bool = False  # add the LoRAs' declared trigger words that the prompt lacks
    init: InitImage | None = None  # img2img / inpainting: what to start from
    guidance: float | None = None  # FLUX.1-dev's distilled guidance (Forge's "Distilled CFG Scale")
    control: Any = None  # a FLUX.1 control LoRA's control image (Canny edges, a depth map): a PIL image


@dataclass(frozen=True)
class Settings:
    """The sampling settings a job runs with."""

    steps: int
    cfg: float
    sampler: str
    clip_skip: int
    guidance: float | None = None  # a distilled guidance model's (FLUX.1-dev); None where none applies

    def as_dict(self) -> dict[str, Any]:
        out = {"steps": self.steps, "cfg": self.cfg, "sampler": self.sampler, "clip_skip": self.clip_skip}
        return out if self.guidance is None else {**out, "guidance": self.guidance}


@dataclass
class Job:
    """A resolved request: everything the generator needs, nothing left to look up."""

    request: Request
    prompt: str  # the prompt as used (tags kept, added trigger words appended): goes into the infotext
    text: str  # the positive text without LoRA tags (+ added trigger words)
    negative_text: str
    refs: list[LoraRef]
    loras: list[LoraModel]
    settings: Settings
    seeds: list[int]
    notes: list[str] = field(default_factory=list)
    prepared: Any = None  # img2img: the init image and mask at the request's size (``init_image.Prepared``)
    width: int = 512  # the request's, or the model's native size where it gave none
    height: int = 512

    @property
    def steps_run(self) -> int:
        """The steps actually sampled: fewer than ``settings.steps`` for img2img (its denoising strength)."""
        init = self.request.init
        return self.settings.steps if init is None else steps_run(self.settings.steps, init.strength)


class LoraSource(Protocol):
    """What request resolution needs of a LoRA library: name → entry (``path``, ``explicit_trigger_words``)."""

    def resolve(self, name: str) -> Any: ...

    def entry(self, path: str) -> Any: ...


def resolve_job(req: Request, library: LoraSource, clip_layers: int, native: int = 512,
                rules: Rules = SD_RULES) -> Job:
    """Check and resolve ``req``. ``clip_layers``: the text encoder's layer count (the deepest clip skip);
    ``native``: the model's side in px, for a width or height left ``None`` (the job's request has both set);
    ``rules``: the model family's defaults and limits."""
    width, height = req.width or native, req.height or native
    pos, neg = parse_prompt(req.prompt), parse_prompt(req.negative, negative=True)
    for warning in pos.warnings + neg.warnings:
        log.warning(warning)
    refs = pos.loras + neg.loras
    entries = [_entry(library, r.name) for r in refs]
    loras = [load_cached(str(e.path)) for e in entries]
    added = _missing_triggers(pos.text, entries[:len(pos.loras)]) if req.auto_triggers else ""
    notes: list[str] = []
    settings = _settings(req, loras, notes, clip_layers, rules)
    _check_limits(req, settings, width, height, rules)
    seed = _seed(req.seed)
    return Job(req, req.prompt + added, pos.text + added, neg.text, refs, loras, settings,
               [seed + i for i in range(req.batch)], notes, width=width, height=height)


def _entry(library: LoraSource, name: str) -> Any:
    """The library entry of ``name`` (``Library.resolve`` may give the entry or, in older callers, its path)."""
    found = library.resolve(name)
    return found if hasattr(found, "path") else library.entry(str(found))


def _missing_triggers(text: str, entries: list[Any]) -> str:
    """``", phrase, …"``: each LoRA's declared trigger phrases that ``text`` lacks (case-blind, each once)."""
    added = ""
    for entry in entries:
        for phrase in entry.explicit_trigger_words:
            phrase = phrase.strip()
            if phrase and phrase.lower() not in (text + added).lower():
                added += f", {phrase}" if (text + added).strip() else phrase
    return added


def _settings(req: Request, loras: list[LoraModel], notes: list[str], clip_layers: int, rules: Rules) -> Settings:
    """Explicit request values win; then what a fast (LCM/Turbo/Hyper) LoRA needs; then the family's defaults."""
    fast = next(((lora, k) for lora in loras if (k := fast_kind(lora))), None) if rules.fast_loras else None
    out: dict[str, Any] = {}
    for key in ("steps", "cfg", "sampler"):
        given = getattr(req, key)
        if given is not None:
            out[key] = given
        elif fast:
            out[key] = SETTINGS[key]
            notes.append(f"{fast[1].upper()} LoRA {fast[0].name}: {key} set to {SETTINGS[key]}")
        else:
            out[key] = rules.defaults[key]
    guidance = _guidance(req, rules, notes)
    clip_skip = _family_clip_skip(req, loras, notes, clip_layers, rules)
    for note in notes:
        log.info(note)
    return Settings(int(out["steps"]), float(out["cfg"]), _sampler(str(out["sampler"]), rules), clip_skip, guidance)


def _guidance(req: Request, rules: Rules, notes: list[str]) -> float | None:
    if "guidance" not in rules.defaults:
        if req.guidance is not None:
            notes.append(f"distilled guidance {req.guidance:g} ignored: this model has none")
        return None
    return float(req.guidance if req.guidance is not None else rules.defaults["guidance"])


def _family_clip_skip(req: Request, loras: list[LoraModel], notes: list[str], clip_layers: int,
                      rules: Rules) -> int:
    if not rules.clip_skip:
        if req.clip_skip not in (None, 1):
            notes.append(f"clip skip {req.clip_skip} ignored: {rules.family} reads the text encoders' last layers")
        return 1
    return _clip_skip(req.clip_skip, clip_layers) if req.clip_skip is not None else \
        _recommended_clip_skip(loras, notes, clip_layers)


def _sampler(name: str, rules: Rules) -> str:
    canonical = sampler_name(name) if rules.samplers == tuple(SAMPLERS) else \
        next((s for s in rules.samplers if s.lower() == name.strip().lower().replace("_", " ")), None)
    if canonical is None:
        raise LorakitError(f"unknown sampler {name!r} for {rules.family}; choose one of: {', '.join(rules.samplers)}")
    return canonical


def _clip_skip(value: int, layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= layers:
        raise LorakitError(f"clip skip must be a whole number from 1 to {layers} (this model's text encoder has "
                           f"{layers} layers; 1 uses the last), got {value!r}")
    return value


def _recommended_clip_skip(loras: list[LoraModel], notes: list[str], layers: int) -> int:
    for lora in loras:
        value = lora.metadata.get("ss_clip_skip", "")
        if value.isascii() and value.isdigit() and 1 < int(value) <= layers:
            notes.append(f"clip skip {value}, as LoRA {lora.name} was trained (ss_clip_skip)")
            return int(value)
    return 1


def _seed(seed: int | None) -> int:
    if seed is None or seed == -1:
        return random.randrange(2 ** 32)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - LIMITS["batch"][1]:
        raise LorakitError(f"seed must be a whole number from 0 to {MAX_SEED - LIMITS['batch'][1]} (or -1 for a "
                           f"random one), got {seed!r}")
    return seed


def _check_limits(req: Request, settings: Settings, width: int, height: int, rules: Rules = SD_RULES) -> None:
    values = {"width": width, "height": height, "steps": settings.steps, "batch": req.batch,
              "cfg": settings.cfg, "guidance": 0.0 if settings.guidance is None else settings.guidance}
    for key, (low, high) in LIMITS.items():
        if not low <= values[key] <= high:  # also False for NaN
            raise LorakitError(f"{key} must be between {low:g} and {high:g}, got {values[key]}")
    for key in ("width", "height"):
        if values[key] % rules.size_step:
            raise LorakitError(f"{key} must be a multiple of {rules.size_step} for this model, got {values[key]}")
        if rules.max_size is not None and values[key] > rules.max_size:
            raise LorakitError(f"{key} must be at most {rules.max_size} for this model (its positional embedding's "
                               f"size), got {values[key]}")
    if req.init is not None:
        req.init.check()
