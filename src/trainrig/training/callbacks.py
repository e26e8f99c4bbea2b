"""Callbacks: the optional observers of a run (the interface, ``Callback``, is in run.py). Built in (builtin.py,
in this order before the configured and the caller's ones): the stall watchdog, progress, curves.png, then the
configured loggers (loggers.py: metrics.csv/steps.csv by default, TensorBoard, MLflow, W&B). Checkpoints and
the weight average are not callbacks: the loop calls them (checkpointing.py, averaging.py).
"""
from __future__ import annotations

from typing import Any, Sequence

from trainrig.errors import ConfigError
from trainrig.imports import construct, import_class
from trainrig.tracking import report
from trainrig.training.progress import Progress, ProgressMode, make_progress
from trainrig.training.run import Callback, Hooks, Run, RunInfo


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

    def on_message(self, run: Run, text: str) -> None:
        self._bar().message(text)

    def on_epoch_start(self, run: Run, epoch: int, batches: int) -> None:
        bar = self._bar()
        if not self.started:
            bar.start(run.cfg.epochs, epoch - 1)
            self.started = True
        bar.start_epoch(epoch, batches)

    def on_train_batch_end(self, run: Run, step: int, loss: Any) -> None:
        bar = self._bar()
        bar.batch(step, float(loss.item()) if bar.wants_loss(step) else None)

    def on_epoch_end(self, run: Run, row: dict) -> None:
        self._bar().end_epoch(row)

    def on_fit_end(self, run: Run) -> None:
        self._bar().close()

    def on_exception(self, run: Run, exc: BaseException) -> None:
        self._bar().close()


class CurvesPlot(Callback):
    """curves.png: loss and accuracy per epoch."""

    def on_epoch_end(self, run: Run, row: dict) -> None:
        report.plot_curves(run.run_dir, run.state.history, title=run.cfg.name)


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


__all__ = ["Callback", "Hooks", "Run", "RunInfo", "ProgressCallback", "CurvesPlot", "from_specs"]
