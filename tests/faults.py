"""Fault injection for tests only: callbacks that make a rank fail or 'run out of memory' on CPU.

They are picklable module-level classes, so they travel to spawned DDP ranks (tests/ is on sys.path in
pytest and in the ranks it spawns); a CLI run names them in ``callbacks`` with PYTHONPATH=tests.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from trainrig.training.callbacks import Callback


class SimulatedOOM(torch.cuda.OutOfMemoryError):
    """Behaves like a real CUDA OOM: trainrig recognises it by type."""


def check_simulated(size: int, limit: int | None) -> None:
    """A batch larger than ``limit`` 'runs out of memory'."""
    if limit is not None and size > limit:
        raise SimulatedOOM(f"CUDA out of memory (simulated: micro-batch {size} > {limit})")


class SimulateOOM(Callback):
    """Training forward passes over more than ``above`` images raise SimulatedOOM (on ``rank`` only, or
    every rank), once ``after`` training forward passes went through.

    The check is a forward pre-hook on the unwrapped model, so it fires where a real OOM would: inside
    the model's forward, after DDP's own pre-forward work."""

    rank_zero_only = False

    def __init__(self, above: int, rank: int | None = None, after: int = 0):
        self.above, self.rank, self.after, self.calls = above, rank, after, 0

    def _check(self, module, args) -> None:
        if module.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.after:
                check_simulated(args[0].shape[0], self.above)

    def setup(self, model, strategy) -> None:  # before the batch-size search, which it limits too
        if self.rank in (None, strategy.env.rank):
            model.register_forward_pre_hook(self._check)


class FailOnRank(Callback):
    """Rank ``rank`` raises at its first training step of (0-based) epoch ``epoch``."""

    rank_zero_only = False

    def __init__(self, rank: int, epoch: int = 0):
        self.rank, self.epoch = rank, epoch

    def on_train_batch_end(self, run, step, loss) -> None:
        if run.strategy.env.rank == self.rank and run.state.epoch == self.epoch:
            raise RuntimeError(f"injected failure on rank {self.rank}")


class Recorder(Callback):
    """Writes every hook it sees, in order, to <run_dir>/<name>-rank<R>.txt (every rank, or rank 0)."""

    def __init__(self, every_rank: bool = False, name: str = "hooks"):
        self.rank_zero_only, self.name = not every_rank, name
        self.lines: list[str] = []

    def _note(self, run, text: str) -> None:
        self.lines.append(text)
        (run.run_dir / f"{self.name}-rank{run.strategy.env.rank}.txt").write_text("\n".join(self.lines) + "\n")

    def on_fit_start(self, run) -> None:
        self._note(run, "fit_start")

    def on_epoch_start(self, run, epoch, batches) -> None:
        self._note(run, f"epoch_start {epoch} {batches}")

    def on_train_batch_end(self, run, step, loss) -> None:
        self._note(run, f"batch {step} {float(loss):.6f}")

    def on_epoch_end(self, run, row) -> None:
        self._note(run, f"epoch_end {row['epoch']} {row['train_loss']:.6f} {row['val_acc']:.6f}")

    def on_fit_end(self, run) -> None:
        self._note(run, "fit_end")

    def on_message(self, run, text) -> None:
        self._note(run, f"message {text}")


class KillOnce(Callback):
    """Rank ``rank`` SIGKILLs its own process once it has done ``step`` optimizer steps (``state.global_step``),
    the first time only: ``marker`` records that it happened, so the restarted process trains on. Like a
    preempted node or an OOM-killed worker: no exception, no cleanup, no chance to save."""

    rank_zero_only = False

    def __init__(self, rank: int, step: int, marker: str):
        self.rank, self.step, self.marker = rank, step, marker

    def on_train_batch_end(self, run, step, loss) -> None:
        if run.strategy.env.rank == self.rank and run.state.global_step == self.step \
                and not Path(self.marker).exists():
            Path(self.marker).write_text(f"killed rank {self.rank} at step {self.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class SaveAverage(Callback):
    """Every rank writes its weight average (model.ema) to <run_dir>/ema-rank<R>.pt at the end of fit."""

    rank_zero_only = False

    def on_fit_end(self, run) -> None:
        torch.save(run.state.ema.tensors, run.run_dir / f"ema-rank{run.strategy.env.rank}.pt")


class SignalSelf(Callback):
    """Rank ``rank`` sends itself ``sig`` (SIGSTOP, SIGTERM, ...) once it has done ``step`` optimizer steps, the
    first time only (``marker`` records it, with the pid). SIGSTOP: a peer the scheduler stopped; SIGTERM /
    SIGUSR1: a preempted rank."""

    rank_zero_only = False

    def __init__(self, rank: int, step: int, marker: str, sig: str = "SIGSTOP"):
        self.rank, self.step, self.marker, self.sig = rank, step, marker, sig

    def on_train_batch_end(self, run, step, loss) -> None:
        if run.strategy.env.rank == self.rank and run.state.global_step == self.step \
                and not Path(self.marker).exists():
            Path(self.marker).write_text(f"{os.getpid()}\n")
            os.kill(os.getpid(), getattr(signal, self.sig))


class StepLog(Callback):
    """Appends ``<rank> <global_step>`` to <run_dir>/steps-rank<R>.log after every optimizer step (every rank):
    the work a process did, to compare with what its checkpoints hold."""

    rank_zero_only = False

    def on_train_batch_end(self, run, step, loss) -> None:
        with open(run.run_dir / f"steps-rank{run.strategy.env.rank}.log", "a") as f:
            f.write(f"{run.strategy.env.rank} {run.state.global_step}\n")


class StopLoaderWorkers(Callback):
    """SIGSTOPs this process's data loader workers once ``step`` optimizer steps are done (a worker the
    system stopped, or one stuck in a read): the main process waits for batches that never come."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, run, step, loss) -> None:
        import multiprocessing

        if run.state.global_step == self.step:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGSTOP)


class WaitFor(Callback):
    """Rank 0 waits (up to two minutes) at the end of its first epoch until ``path`` exists: a run held mid-way
    while a test does something beside it."""

    def __init__(self, path: str):
        self.path = path

    def on_epoch_end(self, run, row) -> None:
        import time

        deadline = time.monotonic() + 120
        while not Path(self.path).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class HoldAt(Callback):
    """Rank 0, after ``step`` optimizer steps, writes ``ready`` and waits (up to two minutes) until it gets
    SIGTERM or SIGUSR1 (passed on to the run's own handler) or a STOP file appears in the run folder (then one
    more second, so the run's once-a-second look at it comes at the next step): the step where the run
    notices a request made meanwhile then does not depend on how fast the steps go."""

    def __init__(self, step: int, ready: str):
        self.step, self.ready = step, ready

    def on_train_batch_end(self, run, step, loss) -> None:
        import time

        if run.state.global_step != self.step or Path(self.ready).exists():
            return
        got = []

        def note(signum, frame):
            got.append(signum)
            previous[signum](signum, frame)
        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        Path(self.ready).write_text(f"{os.getpid()}\n")
        deadline, stop_file = time.monotonic() + 120, Path(run.run_dir) / "STOP"
        while not got and not stop_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if stop_file.exists():
            time.sleep(1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class KillAtEpochEnd(Callback):
    """SIGKILLs the process at the end of epoch ``epoch`` (1-based), after its checkpoint was written (the
    built-in callbacks run first), the first time only (``marker``)."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, marker

    def on_epoch_end(self, run, row) -> None:
        if row["epoch"] == self.epoch and not Path(self.marker).exists():
            Path(self.marker).write_text(f"killed at the end of epoch {self.epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class SplitPrints(Callback):
    """Every rank appends the fingerprints of its train / val / test splits to <run_dir>/splits-rank<R>.txt
    (a tune trial: beside the experiment, in ``folder``)."""

    rank_zero_only = False

    def __init__(self, folder: str = ""):
        self.folder = folder

    def on_fit_start(self, run) -> None:
        from trainrig.data import fingerprint

        splits = run.splits
        line = " ".join(fingerprint(ds) for ds in (splits.train, splits.val, splits.test))
        folder = Path(self.folder) if self.folder else run.run_dir
        with open(folder / f"splits-rank{run.strategy.env.rank}.txt", "a") as f:
            f.write(line + "\n")
