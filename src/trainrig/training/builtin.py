"""The callbacks every run has (before the configured and the caller's ones)."""
from __future__ import annotations

import time
from typing import Any

from trainrig.config import Config
from trainrig.tracking.loggers import make_loggers
from trainrig.training.callbacks import Callback, CurvesPlot, ProgressCallback
from trainrig.training.progress import Progress, ProgressMode
from trainrig.training.watchdog import Watchdog


def builtin(cfg: Config, progress: ProgressMode | Progress = "auto") -> list[Callback]:
    """The stall watchdog (watchdog.py), progress, curves.png, then the configured loggers (loggers.py); with
    model.compile, the line that says what compiling cost."""
    compiled = [CompileTime()] if cfg.model.compile else []
    return [Watchdog(cfg.dist_timeout_s), ProgressCallback(progress), CurvesPlot(), *compiled, *make_loggers(cfg)]


class CompileTime(Callback):
    """model.compile compiles on the first training step: logs, once, that step's seconds against the mean of
    the next three (evaluation compiles its own graph too, at the first validation pass, not counted here)."""

    STEPS = 4

    def __init__(self) -> None:
        self.start: float | None = None
        self.ends: list[float] = []

    def on_epoch_start(self, run: Any, epoch: int, steps: int) -> None:
        if not self.ends:
            self.start = time.perf_counter()

    def on_train_batch_end(self, run: Any, step: int, loss: Any) -> None:
        if self.start is None or len(self.ends) >= self.STEPS:
            return
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.STEPS:
            first, later = self.ends[0] - self.start, (self.ends[-1] - self.ends[0]) / (self.STEPS - 1)
            mode = "default" if run.cfg.model.compile is True else run.cfg.model.compile
            run.log(f"model.compile ({mode}): the first step took {first:.1f} s, the next {later:.2f} s each: "
                    f"compiling took ~{max(first - later, 0.0):.0f} s")
