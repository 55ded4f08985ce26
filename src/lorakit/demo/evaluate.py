"""How well a model draws what it is asked: generate each case of the frozen evaluation set (``evalset``) with
lorakit's own generator — default sampler, steps and CFG unless told otherwise — judge every picture with
``classify`` and count, per attribute, the right ones and the confusions of the misses."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .classify import classify
from .evalset import Case
from .shapes import ATTRIBUTES


@dataclass
class Report:
    right: Counter[str] = field(default_factory=Counter)  # attribute → cases judged right
    asked: Counter[str] = field(default_factory=Counter)  # attribute → cases that say it
    confusions: dict[str, Counter[tuple[str, str]]] = field(
        default_factory=lambda: {a: Counter() for a in ATTRIBUTES})  # attribute → (asked, drawn) → count
    misses: list[str] = field(default_factory=list)

    def add(self, case: Case, judged: dict[str, str | None]) -> None:
        wrong = []
        for attribute in ATTRIBUTES:
            expected = case.expect[attribute]
            if expected is None:
                continue
            self.asked[attribute] += 1
            got = judged[attribute]
            if got == expected:
                self.right[attribute] += 1
            else:
                self.confusions[attribute][(expected, str(got))] += 1
                wrong.append(f"{attribute} {got}")
        if wrong:
            self.misses.append(f"{case.prompt!r} seed {case.seed}: {', '.join(wrong)}")

    def accuracy(self, attribute: str) -> float:
        return self.right[attribute] / max(self.asked[attribute], 1)

    def table(self) -> str:
        """One line per attribute: accuracy, n, and the commonest confusions ("asked→drawn ×n")."""
        lines = []
        for a in ATTRIBUTES:
            top = ", ".join(f"{e}→{g} ×{n}" for (e, g), n in self.confusions[a].most_common(6))
            lines.append(f"{a:<10} {self.accuracy(a):.3f}  ({self.right[a]}/{self.asked[a]})  {top}")
        return "\n".join(lines)


def evaluate(model: Any, cases: list[Case], steps: int | None = None, sampler: str | None = None,
             cfg: float | None = None, on_image: Callable[[Case, Any], None] | None = None) -> Report:
    """The report for ``model`` (a ``BaseModel``) on ``cases``, one image each at its native size."""
    from ..generate.pipeline import Generator, Request
    from ..library import LoraIndex

    report = Report()
    gen = Generator(model, LoraIndex([]))
    model.pipe.set_progress_bar_config(disable=True)
    try:
        for case in cases:
            image = gen(Request(case.prompt, steps=steps, sampler=sampler, cfg=cfg, seed=case.seed)).images[0]
            report.add(case, classify(image).attributes())
            if on_image is not None:
                on_image(case, image)
    finally:
        gen.close()
    return report
