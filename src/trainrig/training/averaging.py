"""``model.ema`` in the loop: the average (ema.py) starts when epoch ``start_epoch`` + 1 begins, is updated every
``every_n_steps`` optimizer steps and is swapped into the model for evaluation. It runs on every rank: DDP
ranks update equal parameters, and rank 0's averaged BatchNorm buffers are broadcast before each evaluation,
so every rank holds the same average. The TrainState carries it (saved, resumed)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from trainrig.config import EMASettings
from trainrig.training.ema import WeightAverage
from trainrig.training.run import Run


class Averaging:
    """What the loop calls; without ``model.ema.decay`` every call does nothing."""

    def __init__(self, settings: EMASettings):
        self.settings = settings

    def epoch_start(self, run: Run, epoch: int) -> None:
        """``epoch`` 1-based."""
        if self.settings.decay and run.state.ema is None and epoch > self.settings.start_epoch:
            run.state.ema = WeightAverage.start(run.model)

    def after_step(self, run: Run) -> None:
        if run.state.ema is not None and run.state.global_step % self.settings.every_n_steps == 0:
            run.state.ema.update(run.model, self.settings.decay)

    @contextlib.contextmanager
    def swapped(self, run: Run) -> Iterator[None]:
        """The average's weights in the model while evaluating (the model's own afterwards)."""
        if run.state.ema is None:
            yield
            return
        with run.state.ema.swapped_into(run.model):
            run.strategy.sync_buffers(run.model)
            run.state.ema.take_buffers(run.model)
            yield
