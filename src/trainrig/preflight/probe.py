"""A probe: ``cfg``'s run built exactly as ``fit`` builds it (strategy and its processes, data, model,
optimizer, precision), in a fresh folder of its own, handed to a function instead of the training loop."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import torch

from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.parallel import DistEnv, run_workers, strategy_class
from trainrig.tracking.runs import PROBE
from trainrig.training.checkpoint import atomic_write_text
from trainrig.training.run import Callback, Held, Run
from trainrig.training.setup import UserParts, build_run
from trainrig.training.watchdog import Watchdog

Body = Callable[[Run, DistEnv], Any]


def probe(cfg: Config, suffix: str, parts: UserParts, body: Body) -> Any:
    """``body(run, env)`` on every process of ``cfg``'s strategy, the run in ``<out_dir>/<name>-<suffix>``
    (a new folder, never resumed, no loggers); rank 0's result. Runs here even with launcher: ray."""
    if (parts.train_data is None) != (parts.test_data is None):
        raise ConfigError(f"{suffix}: give both train_data and test_data, or neither")
    strategy_class(cfg).check(cfg)
    own = dataclasses.replace(cfg, name=f"{cfg.name}-{suffix}", resume="never", restarts=0, loggers=[],
                              callbacks=[], launcher="local")
    with torch.random.fork_rng(devices=[]):  # the caller's random state, as it was
        return run_workers(own, functools.partial(_worker, own, suffix, parts, body), [Watchdog(cfg.dist_timeout_s)])


def _worker(cfg: Config, suffix: str, parts: UserParts, body: Body, env: DistEnv,
            callbacks: Sequence[Callback]) -> Any:
    held: list[Held] = []
    try:
        run = build_run(cfg, "never", parts, env, callbacks, held)
        if env.is_main:  # trainer runs lists runs that train, not this folder
            atomic_write_text(run.run_dir / PROBE, f"{cfg.name}: built by trainer {suffix}, not trained\n")
        saved = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        try:  # a probe steps the optimizer; the caller's network leaves with the weights it came with
            return body(run, env)
        finally:
            run.model.load_state_dict(saved)
    finally:
        for item in reversed(held):
            item.release()


def batches(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches from the first, epoch after epoch, as the run would train on them."""
    epoch = 0
    while True:
        run.train.set_epoch(epoch, 0)
        yield from run.train
        epoch += 1
