"""A run as the loop and its observers see it (``Run``), and the observers' interface (``Callback``, Lightning's
shape, a fraction of its size) with the dispatcher that calls them in order (``Hooks``).

A callback overrides the hooks it needs. ``rank_zero_only`` (default True) runs it on rank 0 alone;
False runs it on every rank. Under spawned DDP, callbacks are pickled into each rank, so they must be
picklable (defined at module level, holding plain data); one with ``in_launcher = True`` instead stays
in the process that called ``fit`` and receives rank 0's ``on_fit_start`` / ``on_epoch_end`` /
``on_test_end`` / ``on_fit_end`` with a ``RunInfo`` (cfg and run_dir only), e.g. Tune reporting.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:  # names for the annotations only: at run time this module imports nothing of trainrig, so
    from torch import nn  # that the launchers (parallel/) can use Callback while Run names a Strategy

    from trainrig.config import Config
    from trainrig.data import Splits
    from trainrig.models import Layout
    from trainrig.parallel.base import Strategy
    from trainrig.training.state import TrainState
    from trainrig.training.step import Stepper


@dataclass
class RunInfo:
    """What a launcher-side callback learns of a run."""

    cfg: Any
    run_dir: Path


class Callback:
    """Base class: every hook does nothing. ``run`` is the worker's ``Run`` (below)."""

    rank_zero_only: bool = True
    in_launcher: bool = False

    def setup(self, model: nn.Module, strategy: Strategy) -> None:
        """The model is built and placed by ``strategy`` (unwrapped), before the batch-size search, the
        optimizer and the batches: instrument it here (e.g. register hooks). Lightning's ``Callback.setup``."""

    def on_fit_start(self, run: Run) -> None:
        """Everything is built: data, model (placed, wrapped), batches, TrainState (restored when resuming)."""

    def on_epoch_start(self, run: Run, epoch: int, batches: int) -> None:
        """``epoch`` is 1-based; ``batches`` this rank's training steps in it."""

    def on_train_batch_end(self, run: Run, step: int, loss: Any) -> None:
        """After an optimizer step; ``loss`` is the batch's mean loss as a device tensor (call ``.item()``
        only when you log it: it waits for the device)."""

    def on_evaluate_start(self, run: Run) -> None:
        """The epoch's training is done (BatchNorm statistics synchronised); the validation pass starts (and
        the test pass, with eval.test_every_epoch)."""

    def on_evaluate_batch_end(self, run: Run, batch: int) -> None:
        """After each evaluation batch (1-based ``batch``)."""

    def on_evaluate_end(self, run: Run) -> None:
        """The test pass is done (also when it raised)."""

    def on_epoch_end(self, run: Run, row: dict) -> None:
        """``row``: the epoch's metrics as floats (epoch, lr, train_loss, train_acc, val_loss, val_acc, ...)."""

    def on_test_end(self, run: Run, report: dict) -> None:
        """The test set was evaluated once, on the chosen checkpoint: ``report`` is eval.json's content."""

    def on_fit_end(self, run: Run) -> None:
        """Training finished normally (after the final test)."""

    def on_exception(self, run: Run, exc: BaseException) -> None:
        """Training raised ``exc`` (it is re-raised after the callbacks ran)."""

    def on_message(self, run: Run, text: str) -> None:
        """A line the run wants shown (folder, batch-size search, OOM recovery)."""


class Hooks(Callback):
    """The callbacks that run in this process (all on rank 0; those with ``rank_zero_only = False`` on every
    rank), each hook called on each, in order."""

    def __init__(self, callbacks: Sequence[Callback], is_main: bool):
        self.callbacks = [cb for cb in callbacks if is_main or not cb.rank_zero_only]

    def setup(self, model: nn.Module, strategy: Strategy) -> None:
        for cb in self.callbacks:
            cb.setup(model, strategy)

    def on_fit_start(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_fit_start(run)

    def on_epoch_start(self, run: Run, epoch: int, batches: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(run, epoch, batches)

    def on_train_batch_end(self, run: Run, step: int, loss: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_batch_end(run, step, loss)

    def on_evaluate_start(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_evaluate_start(run)

    def on_evaluate_batch_end(self, run: Run, batch: int) -> None:
        for cb in self.callbacks:
            cb.on_evaluate_batch_end(run, batch)

    def on_evaluate_end(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_evaluate_end(run)

    def on_epoch_end(self, run: Run, row: dict) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(run, row)

    def on_test_end(self, run: Run, report: dict) -> None:
        for cb in self.callbacks:
            cb.on_test_end(run, report)

    def on_fit_end(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(run)

    def on_exception(self, run: Run, exc: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_exception(run, exc)

    def on_message(self, run: Run, text: str) -> None:
        for cb in self.callbacks:
            cb.on_message(run, text)


class Held(Protocol):
    """What a run holds until it ends, however it ends: the run folder's lock, data loader workers."""

    def release(self) -> None: ...


@dataclass
class Run:
    """A run in a worker process, as the loop and the callbacks see it: built once, before the first hook."""

    cfg: Config
    run_dir: Path
    strategy: Strategy
    model: nn.Module  # unwrapped: its state_dict is what checkpoints hold
    hooks: Hooks
    splits: Splits
    layout: Layout  # new layers and backbone stages of the model
    state: TrainState
    train: Any  # this rank's training batches (data.batches)
    val: Any  # the validation batches; None without a validation split
    test: Any
    stepper: Stepper  # the optimizer steps (running_totals: the epoch so far)
    trainable: tuple[str, ...]  # the backbone stages the wrapped model trains
    stopping: BaseException | None = None  # a stop was asked for and saved (preempt.py): the loop ends the run

    def log(self, text: str) -> None:
        self.hooks.on_message(self, text)
