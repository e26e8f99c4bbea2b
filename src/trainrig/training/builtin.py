"""The callbacks every run has (before the configured and the caller's ones)."""
from __future__ import annotations

from trainrig.config import Config
from trainrig.tracking.loggers import make_loggers
from trainrig.training.callbacks import Callback, CurvesPlot, ProgressCallback
from trainrig.training.progress import Progress, ProgressMode
from trainrig.training.watchdog import Watchdog


def builtin(cfg: Config, progress: ProgressMode | Progress = "auto") -> list[Callback]:
    """The stall watchdog (watchdog.py), progress, curves.png, then the configured loggers (loggers.py)."""
    return [Watchdog(cfg.dist_timeout_s), ProgressCallback(progress), CurvesPlot(), *make_loggers(cfg)]
