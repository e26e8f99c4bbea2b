"""When the loop saves (checkpoint.py says how files are written, the strategy which ranks write them): at
every epoch end and, with ``checkpoint.every_n_steps`` / ``every_minutes``, mid-epoch with the position in the
epoch; ``keep_last`` newest and ``save_top_k`` best are kept. On SIGTERM / SIGUSR1 (preempt.py) every rank
saves at the same step and sets ``run.stopping``, which the loop raises once the step's (or epoch's) hooks ran.
Every rank calls these at the same points: a mid-epoch save sums the epoch's running metrics over ranks."""
from __future__ import annotations

import time

from trainrig import config as config_mod
from trainrig.training import checkpoint, choose
from trainrig.training.preempt import Preempted, StopRequest, stop_message
from trainrig.training.run import Run

CLOCK_EVERY_DDP = 20  # steps between reads of rank 0's clock in a process group (each read is a broadcast)


class Saver:
    """The loop's checkpointing, a plain object the loop calls (not a callback: saving is part of training)."""

    def __init__(self) -> None:
        self.last_save = 0.0
        self.stop = StopRequest()
        self.stop_at_epoch_end = 0

    def start(self, run: Run) -> None:
        self.last_save = time.monotonic()
        if run.strategy.is_main:
            self.stop.clear_file(run.run_dir)
        self.stop.install()

    def close(self) -> None:
        self.stop.uninstall()

    def after_step(self, run: Run, step: int) -> None:
        """Save mid-epoch when due or asked to stop; the epoch's last step is saved by ``after_epoch``."""
        signum = self.stop.poll(run)
        if step >= len(run.train):  # the epoch's end is saved in after_epoch, after evaluation
            self.stop_at_epoch_end = self.stop_at_epoch_end or signum
        elif signum:
            self._save(run, run.state.epoch + 1, partial=run.stepper.running_totals())
            self._stop(run, signum)
        elif self._due(run):
            self._save(run, run.state.epoch + 1, partial=run.stepper.running_totals())

    def after_epoch(self, run: Run, row: dict) -> None:
        chosen = choose.best_row(run.state.history, run.cfg.checkpoint.monitor)
        self._save(run, run.state.epoch, best=chosen is row)
        signum = self.stop.poll(run) or self.stop_at_epoch_end
        if signum and run.state.epoch < run.cfg.epochs:
            self._stop(run, signum)

    def _stop(self, run: Run, signum: int) -> None:
        """Ask the loop to end the run once this step's (or epoch's) hooks are done."""
        state = run.state
        message = stop_message(signum, state.epoch, state.batch, state.global_step,
                               run.run_dir / "checkpoints" / "last.pt") if run.strategy.is_main else ""
        run.stopping = Preempted(message, signum)

    def _due(self, run: Run) -> bool:
        every, minutes = run.cfg.checkpoint.every_n_steps, run.cfg.checkpoint.every_minutes
        if every and run.state.global_step % every == 0:
            return True
        if not minutes:
            return False
        world = run.strategy.env.world_size
        if world > 1 and run.state.global_step % CLOCK_EVERY_DDP:
            return False
        due = time.monotonic() - self.last_save >= minutes * 60
        return bool(run.strategy.broadcast(due)) if world > 1 else due

    def _save(self, run: Run, epoch: int, *, partial: dict | None = None, best: bool = False) -> None:
        self.last_save = time.monotonic()
        folder, settings = run.run_dir / "checkpoints", run.cfg.checkpoint
        run.strategy.save_checkpoint(folder, epoch, run.state, {"config": config_mod.to_dict(run.cfg)}, partial, best)
        if not run.strategy.is_main:
            return
        scores = {int(r["epoch"]): choose.score(r, settings.monitor) for r in run.state.history}
        checkpoint.prune(folder, settings.keep_last, settings.save_top_k, scores,
                         maximize=choose.maximize(settings.monitor))
