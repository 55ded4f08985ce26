"""A preview beside a trained LoRA, as A1111 finds them (``NAME.preview.png``): lorakit's generator draws the
preview prompt with the LoRA at weight 1 on the model it was trained on (default sampler, steps and CFG, the
model's native size, the run's seed), so the page's card shows what the LoRA does."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LorakitError
from ..models.loading import BaseModel

log = logging.getLogger("lorakit.train")


def preview_path(lora: Path) -> Path:
    return lora.with_name(f"{lora.stem}.preview.png")


def write_preview(model: BaseModel, lora: Path, prompt: str, seed: int) -> Path | None:
    """``NAME.preview.png`` of ``prompt`` with ``lora``; ``None`` (and a warning) when it cannot be drawn."""
    from PIL.PngImagePlugin import PngInfo

    from ..generate.pipeline import Generator, Request
    from ..library import Library
    from ..tools.output import atomic_file

    gen = Generator(model, Library([lora.parent]))
    try:
        result = gen(Request(f"{prompt} <lora:{lora.stem}:1>", seed=seed))
    except LorakitError as e:
        log.warning(f"no preview for {lora.name}: {e}")
        return None
    finally:
        gen.close()
    path = preview_path(lora)
    info = PngInfo()
    info.add_text("parameters", result.infotexts[0])  # A1111's infotext, as `lorakit generate` writes it
    with atomic_file(path) as f:
        result.images[0].save(f, format="PNG", pnginfo=info)
    return path
