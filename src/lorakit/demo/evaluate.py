"""How well a model draws what it is asked: generate each prompt of a fixed set (every shape × colour, in
trained and held-out phrasings) with lorakit's own generator and judge the pictures with ``classify``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .classify import classify
from .shapes import COLOURS, HELD_OUT, PHRASINGS, SHAPES, Scene, caption

# Phrasing sets: name → templates (index 0 of PHRASINGS is the plain "a red circle").
SETS: dict[str, tuple[str, ...]] = {"trained": (PHRASINGS[0], PHRASINGS[3]), "held-out": HELD_OUT}


@dataclass(frozen=True)
class Case:
    prompt: str
    shape: str
    colour: str
    phrasing: str  # the set's name


def cases(count: int = len(SHAPES) * len(COLOURS)) -> list[Case]:
    """``count`` prompts; the default 45 ask for every shape × colour once (5 × 9: shape i mod 5, colour i mod 9),
    the phrasing cycling through the trained and held-out sets' templates."""
    templates = [(name, t) for name, ts in SETS.items() for t in ts]
    colours = list(COLOURS)
    out = []
    for i in range(count):
        shape, colour = SHAPES[i % len(SHAPES)], colours[i % len(colours)]
        name, template = templates[i % len(templates)]
        background = "gray" if colour in ("white", "black") else "white"
        out.append(Case(caption(Scene(shape, colour, background), template), shape, colour, name))
    return out


@dataclass
class Scores:
    n: int = 0
    colour: int = 0
    shape: int = 0
    misses: list[str] = field(default_factory=list)

    def add(self, case: Case, colour: str | None, shape: str | None, seed: int) -> None:
        self.n += 1
        self.colour += colour == case.colour
        self.shape += shape == case.shape
        if (colour, shape) != (case.colour, case.shape):
            self.misses.append(f"{case.prompt!r} seed {seed}: got {colour} {shape}")

    def line(self, name: str) -> str:
        return f"{name}: colour {self.colour / max(self.n, 1):.3f}, shape {self.shape / max(self.n, 1):.3f} " \
               f"({self.n} images)"


def evaluate(model: Any, seeds: tuple[int, ...] = (1, 2), steps: int = 20, sampler: str | None = None,
             cases_: list[Case] | None = None) -> dict[str, Scores]:
    """Scores per phrasing set and ``"all"``, for ``model`` (a ``BaseModel``); one batch per prompt (``seeds``
    must be consecutive)."""
    from ..generate.pipeline import Generator, Request
    from ..library import LoraIndex

    scores = {name: Scores() for name in (*SETS, "all")}
    gen = Generator(model, LoraIndex([]))
    model.pipe.set_progress_bar_config(disable=True)
    try:
        for case in cases_ or cases():
            result = gen(Request(case.prompt, steps=steps, width=64, height=64, seed=seeds[0], batch=len(seeds),
                                 sampler=sampler))
            for image, seed in zip(result.images, result.seeds):
                judged = classify(image)
                for name in (case.phrasing, "all"):
                    scores[name].add(case, judged.colour, judged.shape, seed)
    finally:
        gen.close()
    return scores
