"""The one rule for "best" and for stopping early, read wherever trainrig chooses: best.pt and the top-k
checkpoints, the epoch the test set is evaluated on, early stopping, ``trainer runs``, loggers.

Every choice reads a validation or training metric (settings.MONITORS), never a test metric; ``last``
chooses the newest epoch. Ties go to the earlier epoch. Both rules are pure functions of the history,
which the TrainState saves: a resumed run chooses and stops exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any, Sequence


def maximize(metric: str, mode: str = "auto") -> bool:
    """Whether larger is better: accuracies (and ``last``'s epoch) up, losses down, unless ``mode`` says."""
    return mode == "max" if mode in ("max", "min") else not metric.endswith("loss")


def score(row: dict, monitor: str) -> float:
    """The monitored value of an epoch's row (``last``: its epoch number); NaN where the row lacks it."""
    value = row.get("epoch" if monitor == "last" else monitor)
    return float(value) if value is not None else math.nan


def best_row(history: Sequence[dict], monitor: str) -> dict | None:
    """The row ``monitor`` chooses: the best value, the earlier epoch on a tie; None for an empty history."""
    up = maximize(monitor)
    best: dict | None = None
    for row in history:
        value = score(row, monitor)
        if math.isnan(value):
            continue
        if best is None or (value > score(best, monitor) if up else value < score(best, monitor)):
            best = row
    return best


def stop_epoch(history: Sequence[dict], settings: Any) -> int | None:
    """early_stopping: the epoch after which training stops (``patience`` epochs in a row without an
    improvement by more than ``min_delta`` over the best so far: Lightning's rule), or None."""
    if settings.monitor is None:
        return None
    up = maximize(settings.monitor, settings.mode)
    best, waited = None, 0
    for row in history:
        value = score(row, settings.monitor)
        if best is None or (value - best > settings.min_delta if up else best - value > settings.min_delta):
            best, waited = value, 0
        else:
            waited += 1
        if waited >= settings.patience:
            return int(row["epoch"])
    return None
