"""Callbacks: optional behaviour of a run, hooked into ``fit`` (Lightning's shape, a fraction of its size).

A callback overrides the hooks it needs. ``rank_zero_only`` (default True) runs it on rank 0 alone;
False runs it on every rank. Under spawned DDP, callbacks are pickled into each rank, so they must be
picklable (defined at module level, holding plain data); one with ``in_launcher = True`` instead stays
in the process that called ``fit`` and receives rank 0's ``on_fit_start`` / ``on_epoch_end`` /
``on_test_end`` / ``on_fit_end`` with a ``RunInfo`` (cfg and run_dir only), e.g. Tune reporting.

Built in (in this order before the user's): progress, curves.png, the weight average (model.ema), checkpoints,
then the configured loggers (loggers.py: metrics.csv/steps.csv by default, TensorBoard, MLflow, W&B).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from trainrig.training import checkpoint, choose
from trainrig import config as config_mod
from trainrig.tracking import report
from trainrig.training.ema import WeightAverage
from trainrig.errors import ConfigError
from trainrig.imports import construct, import_class
from trainrig.training.preempt import Preempted, StopRequest, stop_message
from trainrig.training.progress import Progress, ProgressMode, make_progress


@dataclass
class RunInfo:
    """What a launcher-side callback learns of a run."""

    cfg: Any
    run_dir: Path


class Callback:
    """Base class: every hook does nothing. ``run`` is the worker's ``loop.Run`` (cfg, run_dir, strategy,
    model, state, log)."""

    rank_zero_only: bool = True
    in_launcher: bool = False

    def on_fit_start(self, run: Any) -> None:
        """The model is built and placed; the optimizer and batches not yet (batch_size may be auto)."""

    def on_epoch_start(self, run: Any, epoch: int, batches: int) -> None:
        """``epoch`` is 1-based; ``batches`` this rank's training steps in it."""

    def on_train_batch_end(self, run: Any, step: int, loss: Any) -> None:
        """After an optimizer step; ``loss`` is the batch's mean loss as a device tensor (call ``.item()``
        only when you log it: it waits for the device)."""

    def on_evaluate_start(self, run: Any) -> None:
        """The epoch's training is done (BatchNorm statistics synchronised); the validation pass starts (and
        the test pass, with eval.test_every_epoch)."""

    def on_evaluate_batch_end(self, run: Any, batch: int) -> None:
        """After each evaluation batch (1-based ``batch``)."""

    def on_evaluate_end(self, run: Any) -> None:
        """The test pass is done (also when it raised)."""

    def on_epoch_end(self, run: Any, row: dict) -> None:
        """``row``: the epoch's metrics as floats (epoch, lr, train_loss, train_acc, val_loss, val_acc, ...)."""

    def on_test_end(self, run: Any, report: dict) -> None:
        """The test set was evaluated once, on the chosen checkpoint: ``report`` is eval.json's content."""

    def on_fit_end(self, run: Any) -> None:
        """Training finished normally (after the final test)."""

    def on_exception(self, run: Any, exc: BaseException) -> None:
        """Training raised ``exc`` (it is re-raised after the callbacks ran)."""

    def on_message(self, run: Any, text: str) -> None:
        """A line the run wants shown (folder, batch-size search, OOM recovery)."""


class Hooks:
    """The callbacks that run in this process, called in order."""

    def __init__(self, callbacks: Sequence[Callback], is_main: bool):
        self.callbacks = [cb for cb in callbacks if is_main or not cb.rank_zero_only]

    def __getattr__(self, hook: str) -> Callable[..., None]:
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(*args)
        return call


class ProgressCallback(Callback):
    """A bar on a terminal, one line per epoch in logs, nothing with ``off``."""

    def __init__(self, progress: ProgressMode | Progress = "auto"):
        self.mode = progress
        self.bar: Progress | None = progress if isinstance(progress, Progress) else None
        self.started = False

    def _bar(self) -> Progress:
        if self.bar is None:  # built in the worker: a rich console does not travel to spawned ranks
            self.bar = make_progress(self.mode)  # type: ignore[arg-type]
        return self.bar

    def on_message(self, run: Any, text: str) -> None:
        self._bar().message(text)

    def on_epoch_start(self, run: Any, epoch: int, batches: int) -> None:
        bar = self._bar()
        if not self.started:
            bar.start(run.cfg.epochs, epoch - 1)
            self.started = True
        bar.start_epoch(epoch, batches)

    def on_train_batch_end(self, run: Any, step: int, loss: Any) -> None:
        bar = self._bar()
        bar.batch(step, float(loss.item()) if bar.wants_loss(step) else None)

    def on_epoch_end(self, run: Any, row: dict) -> None:
        self._bar().end_epoch(row)

    def on_fit_end(self, run: Any) -> None:
        self._bar().close()

    def on_exception(self, run: Any, exc: BaseException) -> None:
        self._bar().close()


class CurvesPlot(Callback):
    """curves.png: loss and accuracy per epoch."""

    def on_epoch_end(self, run: Any, row: dict) -> None:
        report.plot_curves(run.run_dir, run.state.history, title=run.cfg.name)


class WeightAveraging(Callback):
    """model.ema: starts the average (a copy of the weights) when epoch start_epoch + 1 begins, updates it every
    every_n_steps optimizer steps and evaluates with it. It runs on every rank: DDP ranks update equal
    parameters, and rank 0's averaged BatchNorm buffers are broadcast before each test pass, so every rank
    holds the same average. The TrainState carries it (saved, resumed)."""

    rank_zero_only = False

    def __init__(self, settings: Any):
        self.settings = settings
        self.swap = contextlib.ExitStack()

    def on_epoch_start(self, run: Any, epoch: int, batches: int) -> None:
        if run.state.ema is None and epoch > self.settings.start_epoch:
            run.state.ema = WeightAverage.start(run.model)

    def on_train_batch_end(self, run: Any, step: int, loss: Any) -> None:
        if run.state.ema is not None and run.state.global_step % self.settings.every_n_steps == 0:
            run.state.ema.update(run.model, self.settings.decay)

    def on_evaluate_start(self, run: Any) -> None:
        if run.state.ema is None:
            return
        self.swap.enter_context(run.state.ema.swapped_into(run.model))
        run.strategy.sync_buffers(run.model)
        run.state.ema.take_buffers(run.model)

    def on_evaluate_end(self, run: Any) -> None:
        self.swap.close()


class Checkpointing(Callback):
    """Saves at every epoch end and, with checkpoint.every_n_steps / every_minutes, mid-epoch with the
    position in the epoch; keeps keep_last newest and save_top_k best (checkpoint.py names the files).
    It runs on every rank: a mid-epoch save sums the epoch's running metrics over ranks (rank 0 writes).
    On SIGTERM / SIGUSR1 (preempt.py) every rank saves at the same step and sets ``run.stopping``, which the
    loop raises once the step's (or epoch's) callbacks ran."""

    rank_zero_only = False
    CLOCK_EVERY_DDP = 20  # steps between reads of rank 0's clock under ddp (each read is a broadcast)

    def __init__(self) -> None:
        self.last_save = 0.0
        self.stop = StopRequest()
        self.stop_at_epoch_end = 0

    def __getstate__(self) -> dict:  # travels to spawned ranks before fit: no handlers, no pending agreement
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def on_fit_start(self, run: Any) -> None:
        self.last_save = time.monotonic()
        if run.strategy.is_main:
            self.stop.clear_file(run.run_dir)
        self.stop.install()

    def on_fit_end(self, run: Any) -> None:
        self.stop.uninstall()

    def on_exception(self, run: Any, exc: BaseException) -> None:
        self.stop.uninstall()

    def on_train_batch_end(self, run: Any, step: int, loss: Any) -> None:
        signum = self.stop.poll(run)
        if step >= len(run.train):  # the epoch's end is saved in on_epoch_end, after evaluation
            self.stop_at_epoch_end = self.stop_at_epoch_end or signum
        elif signum:
            self._save(run, run.state.epoch + 1, partial=run.stepper.running_totals())
            self._stop(run, signum)
        elif self._due(run):
            self._save(run, run.state.epoch + 1, partial=run.stepper.running_totals())

    def on_epoch_end(self, run: Any, row: dict) -> None:
        chosen = choose.best_row(run.state.history, run.cfg.checkpoint.monitor)
        self._save(run, run.state.epoch, best=chosen is row)
        signum = self.stop.poll(run) or self.stop_at_epoch_end
        if signum and run.state.epoch < run.cfg.epochs:
            self._stop(run, signum)

    def _stop(self, run: Any, signum: int) -> None:
        """Ask the loop to end the run once this step's (or epoch's) callbacks are done."""
        state = run.state
        message = stop_message(signum, state.epoch, state.batch, state.global_step,
                               run.run_dir / "checkpoints" / "last.pt") if run.strategy.is_main else ""
        run.stopping = Preempted(message, signum)

    def _due(self, run: Any) -> bool:
        every, minutes = run.cfg.checkpoint.every_n_steps, run.cfg.checkpoint.every_minutes
        if every and run.state.global_step % every == 0:
            return True
        if not minutes:
            return False
        world = run.strategy.env.world_size
        if world > 1 and run.state.global_step % self.CLOCK_EVERY_DDP:
            return False
        due = time.monotonic() - self.last_save >= minutes * 60
        return bool(run.strategy.broadcast(due)) if world > 1 else due

    def _save(self, run: Any, epoch: int, *, partial: dict | None = None, best: bool = False) -> None:
        self.last_save = time.monotonic()
        folder, settings = run.run_dir / "checkpoints", run.cfg.checkpoint
        run.strategy.save_checkpoint(folder, epoch, run.state, {"config": config_mod.to_dict(run.cfg)}, partial, best)
        if not run.strategy.is_main:
            return
        scores = {int(r["epoch"]): choose.score(r, settings.monitor) for r in run.state.history}
        checkpoint.prune(folder, settings.keep_last, settings.save_top_k, scores,
                         maximize=choose.maximize(settings.monitor))


def from_specs(specs: Sequence[dict]) -> list[Callback]:
    """Callbacks named in the config: ``{class_path: pkg.module.Class, init_args: {...}}`` (imported, never
    evaluated), as Lightning's CLI names them."""
    out = []
    for i, spec in enumerate(specs):
        path, args = spec.get("class_path"), spec.get("init_args") or {}
        unknown = set(spec) - {"class_path", "init_args"}
        if not isinstance(path, str) or "." not in path or unknown or not isinstance(args, dict):
            raise ConfigError(f"callbacks[{i}]: expected {{class_path: package.module.Class, init_args: {{...}}}}, "
                              f"got {spec!r}")
        cls = import_class(path, f"callbacks[{i}].class_path", Callback, "trainrig.Callback")
        out.append(construct(cls, args, f"callbacks[{i}].init_args"))
    return out
