"""Per-step LoRA strengths (``<lora:x:te=0.1@1,0.6@6>``, ``start=``/``stop=``): the schedule of a job's LoRAs.

The LoRAs are resolved and checked once (``apply``); later steps only change strengths (``Patcher.update`` in
hooks mode) — no plan is rebuilt per step. Without a schedule the LoRAs are fused once, with no per-step cost.
"""
from __future__ import annotations

import logging

from ..lora_model import LoraModel
from ..patch import Patcher
from ..prompt import LoraRef, Schedule

log = logging.getLogger("lorakit")


class LoraSchedule:
    def __init__(self, refs: list[LoraRef], loras: list[LoraModel], steps: int) -> None:
        self.refs = refs
        self.loras = loras
        self.steps = steps
        self.scheduled = any(r.scheduled for r in refs)
        # The text encoder's strength moves: the prompt must be re-encoded when it does.
        self.te_scheduled = any(isinstance(r.te, Schedule) or r.start is not None or r.stop is not None
                                for r in refs)

    def specs(self, step: int | None) -> list[tuple[LoraModel, dict[str, object]]]:
        """(LoRA, weight spec) pairs at ``step`` (1-based; ``None``: unscheduled)."""
        return [(lora, ref.spec(step, self.steps)) for ref, lora in zip(self.refs, self.loras)]

    def apply(self, patcher: Patcher, mode: str = "fused") -> None:
        """Make this job's LoRAs active: in ``mode`` (fused by default), or hooks at step 1 when any strength is
        scheduled."""
        if not self.scheduled:
            patcher.set(self.specs(None), mode=mode)
            return
        patcher.set(self.specs(1), mode="hooks", log_reports=True)
        for ref in self.refs:
            if ref.scheduled:
                log.info(f"LoRA {ref.name}: {describe(ref)}")

    def advance(self, patcher: Patcher, step: int) -> bool:
        """Strengths of ``step``; whether the text encoder's strengths changed (re-encode the prompt)."""
        before = self.specs(step - 1) if self.te_scheduled else []
        specs = self.specs(step)
        patcher.update([spec for _, spec in specs])
        return any(b[1]["te"] != s[1]["te"] for b, s in zip(before, specs))


def describe(ref: LoraRef) -> str:
    """``te 0.1@1 → 0.6@6, unet 1, steps 3–8``: the whole schedule, for the console."""
    def value(v: float | Schedule) -> str:
        if isinstance(v, Schedule):
            return " → ".join(f"{val:g}@{pos:g}" for pos, val in sorted(v.points))
        return f"{v:g}"

    text = f"te {value(ref.te)}, unet {value(ref.unet)}"
    if ref.start is not None or ref.stop is not None:
        text += f", from {ref.start if ref.start is not None else 'the start'} to " \
                f"{ref.stop if ref.stop is not None else 'the end'}"
    return text + " (per step)"
