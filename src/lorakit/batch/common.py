"""What grids and batches share: the LoRA set of a request (the key that orders work so weights switch rarely),
PNGs written atomically (``files.output``), and a progress line on stderr."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from ..files.output import write_atomic
from ..prompt import parse_prompt

LoraSet = tuple[str, ...]


def lora_set(prompt: str, negative: str = "") -> LoraSet:
    """The LoRAs a request applies, with every weight as written (``repr`` of each ``LoraRef`` without its
    column): two requests with the same set need no weight switch between them. Raises ``PromptSyntaxError``."""
    refs = parse_prompt(prompt).loras + parse_prompt(negative, negative=True).loras
    return tuple(sorted(repr(replace(r, column=0)) for r in refs))


def save_png_atomic(image: Any, path: Path, text: str) -> None:
    """``save_png`` (the image with its infotext) under a temporary name, then renamed onto ``path``."""
    from ..generate.infotext import save_png

    write_atomic(path, lambda tmp: save_png(image, tmp, text))


class Progress:
    """``LABEL 3/12 [######------] 25% 0:41 left`` on stderr: redrawn in place on a terminal, else one line per
    finished unit at most every ``every`` seconds (and the last). ``part`` moves the bar within a unit (steps)."""

    WIDTH = 24

    def __init__(self, total: int, label: str, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.total, self.label, self.done = max(total, 0), label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.started, self.last = every, time.monotonic(), 0.0

    def part(self, fraction: float) -> None:
        """The unit in progress is ``fraction`` done (redrawn on a terminal only)."""
        if self.tty:
            self._draw(self.done + min(max(fraction, 0.0), 1.0))

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty or now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self._draw(self.done)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, position: float) -> None:
        fraction = position / self.total if self.total else 1.0
        filled = int(fraction * self.WIDTH)
        elapsed = time.monotonic() - self.started
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        text = (f"{self.label} {self.done}/{self.total} [{'#' * filled}{'-' * (self.WIDTH - filled)}] "
                f"{fraction:4.0%} {_clock(elapsed)} elapsed, {_clock(left)} left")
        self.stream.write(f"\r{text}" if self.tty else f"{text}\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
