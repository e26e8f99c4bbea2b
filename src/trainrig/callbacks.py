"""Callbacks: optional behaviour of a run, hooked into ``fit`` (Lightning's shape, a fraction of its size).

A callback overrides the hooks it needs. ``rank_zero_only`` (default True) runs it on rank 0 alone;
False runs it on every rank. Under spawned DDP, callbacks are pickled into each rank, so they must be
picklable (defined at module level, holding plain data); one with ``in_launcher = True`` instead stays
in the process that called ``fit`` and receives rank 0's ``on_fit_start`` / ``on_epoch_end`` /
``on_fit_end`` with a ``RunInfo`` (cfg and run_dir only), e.g. Tune reporting.

Built in (in this order before the user's): progress, curves.png, checkpoints, then the configured loggers
(loggers.py: metrics.csv/steps.csv by default, TensorBoard, MLflow, W&B).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import checkpoint, config as config_mod, report
from .errors import ConfigError
from .imports import construct, import_object
from .progress import Progress, ProgressMode, make_progress


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

    def on_epoch_end(self, run: Any, row: dict) -> None:
        """``row``: the epoch's metrics as floats (epoch, lr, train_loss, train_acc, test_loss, test_acc, ...)."""

    def on_fit_end(self, run: Any) -> None:
        """Training finished normally."""

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


class Checkpointing(Callback):
    """checkpoints/last.pt every epoch and best.pt when test accuracy improves, written atomically; each
    holds the TrainState and the resolved config."""

    def on_epoch_end(self, run: Any, row: dict) -> None:
        folder = run.run_dir / "checkpoints"
        state = {**run.state.state_dict(), "config": config_mod.to_dict(run.cfg)}
        checkpoint.save(folder / "last.pt", state)
        earlier = [r["test_acc"] for r in run.state.history[:-1]]
        if not earlier or row["test_acc"] > max(earlier):
            checkpoint.save(folder / "best.pt", state)


def builtin(cfg: Any, progress: ProgressMode | Progress = "auto") -> list[Callback]:
    """Progress, curves.png and checkpoints, then the configured loggers (loggers.py)."""
    from .loggers import make_loggers

    return [ProgressCallback(progress), CurvesPlot(), Checkpointing(), *make_loggers(cfg)]


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
        cls = import_object(path, f"callbacks[{i}].class_path")
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise ConfigError(f"callbacks[{i}].class_path: {path} is not a trainrig.callbacks.Callback")
        out.append(construct(cls, args, f"callbacks[{i}].init_args"))
    return out
