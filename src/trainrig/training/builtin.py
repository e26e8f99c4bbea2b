"""The callbacks every run has (before the configured and the caller's ones)."""
from __future__ import annotations

from typing import Any

from trainrig.tracking.loggers import make_loggers
from trainrig.training.callbacks import Callback, CurvesPlot, Checkpointing, ProgressCallback, WeightAveraging
from trainrig.training.progress import Progress, ProgressMode
from trainrig.training.watchdog import Watchdog


def builtin(cfg: Any, progress: ProgressMode | Progress = "auto") -> list[Callback]:
    """The watchdog (watchdog.py), progress, curves.png, the weight average (when model.ema.decay is set) and checkpoints, then the
    configured loggers (loggers.py)."""
    average = [WeightAveraging(cfg.model.ema)] if cfg.model.ema.decay else []
    return [Watchdog(cfg.dist_timeout_s), ProgressCallback(progress), CurvesPlot(), *average, Checkpointing(),
            *make_loggers(cfg)]
