"""Generation with LoRAs from the prompt: the only module that drives diffusers pipelines.

Per request: parse the LoRA tags of prompt and negative prompt, resolve their names in the LoRA folders, apply
them (fused; hooks when a strength is scheduled per step), encode the prompts the A1111 way, run the sampler, and
return images with A1111 infotext. LoRAs stay applied between requests so the next one switches only what
changes; ``close()`` restores the model. Any error restores it before it propagates.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import LorakitError
from ..library import EmbeddingIndex, Library, bundled_embeddings
from ..library.embeddings import Embedding
from ..lora_model import LoraModel, load_cached
from ..models.loading import BaseModel
from ..patch import patcher_for
from ..prompt import LoraRef, parse_prompt
from .conditioning import encode_pair
from .fast_loras import SETTINGS, fast_kind
from .infotext import infotext
from .samplers import sampler_name, scheduler_for

log = logging.getLogger("lorakit")
DEFAULTS = {"steps": 20, "cfg": 7.0, "sampler": "Euler a"}
LIMITS = {"width": (64, 2048), "height": (64, 2048), "steps": (1, 150), "batch": (1, 16), "cfg": (0.0, 30.0)}


@dataclass
class Request:
    prompt: str
    negative: str = ""
    steps: int | None = None  # None: default, or what an LCM/Turbo LoRA needs
    cfg: float | None = None
    sampler: str | None = None
    seed: int | None = None  # None: random
    width: int = 512
    height: int = 512
    batch: int = 1
    clip_skip: int | None = None
    auto_triggers: bool = False  # add the LoRAs' declared trigger words that the prompt lacks


@dataclass
class Result:
    images: list[Any]
    seeds: list[int]
    infotexts: list[str]
    notes: list[str] = field(default_factory=list)
    prompt: str = ""  # the prompt as used (with added trigger words)
    settings: dict[str, Any] = field(default_factory=dict)  # steps, cfg, sampler, clip_skip as used


class Generator:
    def __init__(self, model: BaseModel, loras: Library, embeddings: EmbeddingIndex | None = None) -> None:
        self.model = model
        self.index = loras
        self.embeddings = embeddings
        self.patcher = patcher_for(model.pipe)
        self.on_step: Callable[[int, int], None] | None = None  # (step done, steps): progress reports
        # The model's own scheduler says what its UNet predicts (SD2-768 models predict v, not the noise).
        self.prediction_type = str(model.pipe.scheduler.config.get("prediction_type", "epsilon"))

    def close(self) -> None:
        """Put every weight back (bit-exact)."""
        self.patcher.restore()

    def __call__(self, req: Request) -> Result:
        try:
            return self._generate(req)
        except BaseException:
            self.patcher.restore()
            raise

    def _generate(self, req: Request) -> Result:
        pos, neg = parse_prompt(req.prompt), parse_prompt(req.negative, negative=True)
        for warning in pos.warnings + neg.warnings:
            log.warning(warning)
        refs = pos.loras + neg.loras
        paths = [self.index.resolve(r.name) for r in refs]
        loras = [load_cached(p) for p in paths]
        added = self._missing_triggers(pos.text, paths[:len(pos.loras)]) if req.auto_triggers else ""
        text = pos.text + added
        settings, notes = self._settings(req, loras)
        _check_limits(req, settings)
        scheduled = any(r.scheduled for r in refs)
        steps = int(settings["steps"])
        self._apply(refs, loras, steps, step=1 if scheduled else None)
        encoders = self._encoders()
        embeds = self._embeddings_for(text + "\n" + neg.text, loras)
        cond, uncond = encode_pair(text, neg.text, encoders, settings["clip_skip"], self.model.sdxl, embeds)
        self.model.pipe.scheduler = scheduler_for(settings["sampler"], self.prediction_type)
        seed = req.seed if req.seed is not None else random.randrange(2 ** 32)
        seeds = [seed + i for i in range(req.batch)]
        callback = self._step_callback(refs, loras, steps, text, neg.text, settings, embeds) if scheduled \
            else None
        images = self._run(cond, uncond, settings, req, seeds, callback)
        prompt = req.prompt + added
        texts = [self._infotext(req, prompt, settings, s, refs, loras) for s in seeds]
        return Result(images, seeds, texts, notes, prompt, settings)

    def _missing_triggers(self, text: str, paths: list[Path]) -> str:
        """``", word, …"``: each LoRA's declared trigger words that ``text`` lacks (case-blind, each once)."""
        added = ""
        for path in paths:
            for word in self.index.entry(path).explicit_trigger_words:
                if word.lower() not in (text + added).lower():
                    added += f", {word}" if (text + added).strip() else word
        return added

    def _settings(self, req: Request, loras: list[LoraModel]) -> tuple[dict[str, Any], list[str]]:
        """Explicit request values win; then what a fast (LCM/Turbo/Hyper) LoRA needs; then defaults."""
        notes: list[str] = []
        fast = next(((lora, k) for lora in loras if (k := fast_kind(lora))), None)
        out: dict[str, Any] = {}
        for key in ("steps", "cfg", "sampler"):
            given = getattr(req, key)
            if given is not None:
                out[key] = given
            elif fast:
                out[key] = SETTINGS[key]
                notes.append(f"{fast[1].upper()} LoRA {fast[0].name}: {key} set to {SETTINGS[key]}")
            else:
                out[key] = DEFAULTS[key]
        out["sampler"] = sampler_name(str(out["sampler"]))
        out["clip_skip"] = req.clip_skip or self._recommended_clip_skip(loras, notes)
        for note in notes:
            log.info(note)
        return out, notes

    def _recommended_clip_skip(self, loras: list[LoraModel], notes: list[str]) -> int:
        for lora in loras:
            value = lora.metadata.get("ss_clip_skip", "")
            if value.isdigit() and int(value) > 1:
                notes.append(f"clip skip {value}, as LoRA {lora.name} was trained (ss_clip_skip)")
                return int(value)
        return 1

    def _apply(self, refs: list[LoraRef], loras: list[LoraModel], steps: int, step: int | None) -> None:
        pairs = [(lora, ref.spec(step, steps)) for ref, lora in zip(refs, loras)]
        mode = "hooks" if step is not None else "fused"
        self.patcher.set(pairs, mode=mode, log_reports=step in (None, 1))

    def _encoders(self) -> list[tuple[torch.nn.Module, Any]]:
        pipe = self.model.pipe
        pairs = [(pipe.text_encoder, pipe.tokenizer)]
        if self.model.sdxl:
            pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
        return pairs

    def _embeddings_for(self, text: str, loras: list[LoraModel]) -> dict[str, Embedding]:
        """Embeddings from the embedding folders named in the text, and those bundled in the prompt's LoRAs."""
        found = self.embeddings.used_in(text) if self.embeddings else {}
        for lora in loras:
            found.update(bundled_embeddings(lora.embeddings, lora.path))
        for name in found:
            log.info(f"embedding {name} ({found[name].path}): {found[name].tokens} token(s)")
        return found

    def _step_callback(self, refs: list[LoraRef], loras: list[LoraModel], steps: int, prompt: str, negative: str,
                       settings: dict[str, Any], embeds: dict[str, Embedding]) -> Any:
        """Before each next step: the scheduled strengths of that step; re-encode when a te schedule moves."""
        te_scheduled = any(not isinstance(r.te, float) or r.start is not None or r.stop is not None for r in refs)
        cfg = float(settings["cfg"]) > 1

        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if i + 2 > steps:
                return kwargs
            self._apply(refs, loras, steps, step=i + 2)
            if te_scheduled:
                cond, uncond = encode_pair(prompt, negative, self._encoders(), settings["clip_skip"],
                                           self.model.sdxl, embeds)
                kwargs["prompt_embeds"] = torch.cat([uncond.embeds, cond.embeds]) if cfg else cond.embeds
            return kwargs

        return callback

    def _run(self, cond: Any, uncond: Any, settings: dict[str, Any], req: Request, seeds: list[int],
             callback: Any) -> list[Any]:
        kwargs: dict[str, Any] = dict(
            prompt_embeds=cond.embeds, negative_prompt_embeds=uncond.embeds, num_inference_steps=settings["steps"],
            guidance_scale=float(settings["cfg"]), width=req.width, height=req.height,
            num_images_per_prompt=req.batch, generator=[torch.Generator().manual_seed(s) for s in seeds])
        if self.model.sdxl:
            kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
        if callback is not None or self.on_step is not None:
            kwargs.update(callback_on_step_end=self._with_progress(callback, int(settings["steps"])),
                          callback_on_step_end_tensor_inputs=["prompt_embeds"] if callback else ["latents"])
        with torch.no_grad():
            return list(self.model.pipe(**kwargs).images)

    def _with_progress(self, callback: Any, steps: int) -> Any:
        def step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if self.on_step is not None:
                self.on_step(i + 1, steps)
            return callback(pipe, i, t, kwargs) if callback is not None else kwargs

        return step_end

    def _infotext(self, req: Request, prompt: str, settings: dict[str, Any], seed: int, refs: list[LoraRef],
                  loras: list[LoraModel]) -> str:
        params = {"Steps": settings["steps"], "Sampler": settings["sampler"], "CFG scale": settings["cfg"],
                  "Seed": seed, "Size": f"{req.width}x{req.height}", "Model hash": self.model.hash,
                  "Model": self.model.name, "Clip skip": settings["clip_skip"] if settings["clip_skip"] > 1 else None}
        hashes = {ref.name: self._short_hash(lora) for ref, lora in zip(refs, loras)}
        return infotext(prompt, req.negative, params, hashes)

    def _short_hash(self, lora: LoraModel) -> str:
        """A1111's short hash, computed once per file version and kept in the library's index."""
        return self.index.hashes(self.index.entry(str(lora.path)))["a1111_short"]


def _check_limits(req: Request, settings: dict[str, Any]) -> None:
    values = {"width": req.width, "height": req.height, "steps": settings["steps"], "batch": req.batch,
              "cfg": settings["cfg"]}
    for key, (low, high) in LIMITS.items():
        if not low <= values[key] <= high:
            raise LorakitError(f"{key} must be between {low:g} and {high:g}, got {values[key]}")
    for key in ("width", "height"):
        if values[key] % 8:
            raise LorakitError(f"{key} must be a multiple of 8, got {values[key]}")
