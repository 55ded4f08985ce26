"""The demo model's evaluation set, frozen: prompts × seeds that no training caption contains, each asking for a
combination of shape, colour, size, position and count that no training picture has (``shapes.held_out``), in a
phrasing no training caption has (``captions.HELD_OUT``). Written once by ``scripts/make_demo_evalset.py`` into
``data/demo/evalset.jsonl`` before the model it measures was trained, and never changed since (its SHA-256 is
checked by the tests); nothing is tuned on it. ``ci_slice`` is the part the test suite runs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .weights import DATA_DIR

EVALSET = DATA_DIR / "evalset.jsonl"
SHA256 = "a65875fa10ad2d78f47422d3bd028b4e3238a149a0e65774960e17b325e84743"  # of EVALSET as frozen
CI_EVERY = 12  # the CI slice: every twelfth case (27 of 324)


@dataclass(frozen=True)
class Case:
    prompt: str
    seed: int
    expect: dict[str, str | None]  # attribute → word; None: the prompt does not say (its background)

    def line(self) -> str:
        return json.dumps({"prompt": self.prompt, "seed": self.seed, "expect": self.expect}, sort_keys=True)


def load(path: Path = EVALSET) -> list[Case]:
    with open(path, encoding="utf-8") as f:
        return [Case(**json.loads(line)) for line in f if line.strip()]


def ci_slice(cases: list[Case]) -> list[Case]:
    return cases[::CI_EVERY]
