"""Training progress: a tqdm bar (step, smoothed loss, it/s, ETA) on a terminal; without one (a log file, a CI
job) one plain line about every 10 % of the steps, so a log shows how the run goes without a line per step."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

SHARE = 0.1  # a line every 10 % of the run


def progress(total: int, start: int, enabled: bool, stream: TextIO | None = None) -> Any:
    """A bar or a ``Lines`` reporter (both: ``update(loss)``, ``close()``); ``None`` when not ``enabled``."""
    if not enabled:
        return None
    stream = stream or sys.stderr
    if stream.isatty() and os.environ.get("LORAKIT_PROGRESS") != "0":
        return Bar(total, start)
    return Lines(total, start, stream)


class Bar:
    def __init__(self, total: int, start: int) -> None:
        from tqdm.auto import tqdm

        self.tqdm = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)

    def update(self, loss: float) -> None:
        self.tqdm.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.tqdm.update(1)

    def close(self) -> None:
        self.tqdm.close()


class Lines:
    """``training: step 40/400 (10%), loss 0.0123, 2.31 it/s, ETA 2m36s`` at each tenth of the run and the end."""

    def __init__(self, total: int, start: int, stream: TextIO, clock: Any = time.monotonic) -> None:
        self.total, self.step, self.first, self.stream, self.clock = total, start, start, stream, clock
        self.began = clock()
        self.every = max(1, round(total * SHARE))

    def update(self, loss: float) -> None:
        self.step += 1
        if self.step % self.every == 0 or self.step == self.total:
            self.stream.write(self.line(loss) + "\n")
            self.stream.flush()

    def line(self, loss: float) -> str:
        done = self.step - self.first
        rate = done / max(self.clock() - self.began, 1e-9)
        eta = (self.total - self.step) / rate if rate > 0 else 0.0
        return (f"training: step {self.step}/{self.total} ({100 * self.step // self.total}%), loss {loss:.4f}, "
                f"{rate:.2f} it/s, ETA {_duration(eta)}")

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"
