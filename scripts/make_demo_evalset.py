#!/usr/bin/env python
"""Write the demo model's frozen evaluation set (``lorakit/data/demo/evalset.jsonl``) by a fixed rule — run once,
before the model it measures was trained; kept as written since (``lorakit.demo.evalset``).

The rule: every held-out combination of shape, colour, size, position and count (``shapes.held_out``: 81 of 585)
four times, in an order shuffled per round; each time a background drawn among those the colour shows on, a
held-out phrasing (``captions.HELD_OUT``) drawn in a shuffled order, skipping any whose caption a training
picture of that scene could get (two shapes in the middle make some phrasings coincide), and a seed in 1..99,999.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorakit.demo.captions import HELD_OUT, caption, names_background, training_captions
from lorakit.demo.evalset import EVALSET, Case
from lorakit.demo.shapes import BACKGROUNDS, Scene, combinations, held_out

SEED = 24
ROUNDS = 4


def case(combo: Scene, rng: np.random.Generator) -> Case:
    backgrounds = [b for b in BACKGROUNDS if b != combo.colour]
    scene = Scene(combo.shape, combo.colour, backgrounds[rng.integers(len(backgrounds))], combo.size,
                  combo.position, combo.count)
    trained = training_captions(scene)
    for i in rng.permutation(len(HELD_OUT)):
        phrasing = HELD_OUT[int(i)]
        prompt = caption(scene, phrasing)
        if prompt not in trained:
            expect: dict[str, str | None] = dict(scene.attributes())
            if not names_background(phrasing):
                expect["background"] = None
            return Case(prompt, int(rng.integers(1, 100_000)), expect)
    raise ValueError(f"no held-out phrasing of {scene} differs from its training captions")


def main() -> int:
    rng = np.random.default_rng(SEED)
    combos = sorted((c for c in combinations() if held_out(c)), key=lambda c: c.attributes()["shape"] + repr(c))
    cases = [case(combos[int(i)], rng) for _ in range(ROUNDS) for i in rng.permutation(len(combos))]
    EVALSET.write_text("".join(c.line() + "\n" for c in cases), encoding="utf-8")
    print(f"{len(cases)} cases written to {EVALSET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
