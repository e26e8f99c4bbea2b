"""Parallel modes: one strategy class per mode, which owns how its processes start, how the model is wrapped,
how values are reduced and how checkpoints are written (base.py says what a strategy answers); the launchers
that start a group of processes here, join torchrun's, or run on a Ray cluster (launch.py, ray_train.py).

A new mode is one class in this folder and one name in ``STRATEGIES`` (and ``Config.strategy``'s list).
"""
from __future__ import annotations

from typing import Any, Sequence

from trainrig.config import Config
from trainrig.parallel.base import DistEnv, Strategy, Worker, default_threads, resolve_device
from trainrig.parallel.ddp import DDPStrategy
from trainrig.parallel.fsdp import FSDPStrategy
from trainrig.parallel.local import DataParallelStrategy, ModelParallelStrategy, SingleStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "single": SingleStrategy,
    "dp": DataParallelStrategy,
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "model_parallel": ModelParallelStrategy,
}


def strategy_class(cfg: Config) -> type[Strategy]:
    return STRATEGIES[cfg.strategy]


def make_strategy(cfg: Config, env: DistEnv) -> Strategy:
    return strategy_class(cfg)(cfg, env)


def run_workers(cfg: Config, worker: Worker, callbacks: Sequence[Any], again: Worker | None = None) -> Any:
    """Run ``worker(env, callbacks)`` in every process ``cfg.strategy`` needs; rank 0's result."""
    return strategy_class(cfg).launch(cfg, worker, callbacks, again)


__all__ = ["STRATEGIES", "DistEnv", "Strategy", "SingleStrategy", "strategy_class", "make_strategy", "run_workers",
           "default_threads", "resolve_device"]
