"""Planning a run, once, before it trains: the resume mode, the run folder (rank 0 picks and locks it) and
the checkpoint to resume from, with the warnings to show. Every rank gets rank 0's decision."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from trainrig.training import checkpoint
from trainrig import config as config_mod
from trainrig.tracking import report
from trainrig.config import Config
from trainrig.errors import CheckpointError, ConfigError, TrainrigError
from trainrig.config.resume import mutated, resume_config
from trainrig.training.runlock import RunInUse, RunLock
from trainrig.training.state import TrainState
from trainrig.parallel.base import Strategy


def resume_mode(cfg: Config, resume: bool | str) -> str:
    """strict (``--resume``: the checkpoint must exist), auto (``--resume auto`` / ``resume: auto``) or never."""
    return "strict" if resume is True else "auto" if "auto" in (resume, cfg.resume) else "never"


def run_folder(cfg: Config, mode: str) -> tuple[Config, Path, Path | None, list[str]]:
    """never: a new run folder. strict: the existing one and the config it was trained with (only ``epochs``
    and keys that do not change the result may differ: resume.resume_config). auto: strict when the folder
    has a checkpoint, else a fresh start in that folder (it holds no trained state). Resuming takes the
    newest readable checkpoint (returned with warnings about unreadable ones passed over)."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if mode != "never" and run_dir.exists() and not run_dir.is_dir():  # else each restart would start elsewhere
        raise ConfigError(f"--resume: {run_dir} is a file, not a run folder; move it or choose another name")
    folder = run_dir / "checkpoints"
    found = folder.is_dir() and any(folder.glob("*.pt"))
    if mode == "never" or (mode == "auto" and not found):
        if mode == "auto" and run_dir.is_dir():
            return cfg, run_dir, None, []
        run_dir = report.new_run_dir(cfg.out_dir, cfg.name)
        return dataclasses.replace(cfg, name=run_dir.name), run_dir, None, []
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {folder} (--resume auto starts the run when there is none)")
    saved, path, warnings = checkpoint.newest_readable(folder)
    trained = config_mod.from_dict(saved["config"])
    warnings = [f"warning: {w}" for w in warnings]
    changes = ", ".join(f"{k}={new!r} (was {old!r})" for k, (old, new) in mutated(trained, cfg).items())
    if changes:
        warnings.append(f"pbt: continuing {path.name} with {changes}, set in place")
    return resume_config(trained, cfg, int(saved["epoch"])), run_dir, path, warnings


def claim(cfg: Config, mode: str, held: list[RunLock]) -> tuple[Config, Path, Path | None, list[str]]:
    """Rank 0: the run folder (``run_folder``), locked before its checkpoints are read (runlock.py); a fresh
    run that lost a race for a new folder takes the next name."""
    folder = Path(cfg.out_dir) / cfg.name
    lock = RunLock.acquire(folder) if mode != "never" and folder.is_dir() else None
    for _ in range(20):
        try:
            found = run_folder(cfg, mode)
            lock = lock or RunLock.acquire(found[1])
        except RunInUse:
            if mode == "never":
                continue
            raise
        except BaseException:
            if lock:
                lock.release()
            raise
        held.append(lock)
        return (*found[:3], [lock.note] * bool(lock.note) + found[3])
    raise RunInUse(f"{cfg.out_dir}: other runs keep taking the new folders for {cfg.name!r}")


def main_decides(strategy: Strategy, decide: Callable[[], Any]) -> Any:
    """Rank 0 runs ``decide`` (e.g. picks the run folder) and every rank gets its result or its error."""
    outcome: Any = None
    if strategy.is_main:
        try:
            outcome = ("ok", decide())
        except TrainrigError as exc:
            outcome = ("error", exc)
    status, value = strategy.broadcast(outcome)
    if status == "error":
        raise value
    return value


def resumed_how(state: TrainState, resumed: Path | None, mode: str) -> str:
    if resumed is None:
        return " (resume auto: no checkpoint yet, starting)" if mode == "auto" else ""
    where = f"epoch {state.epoch + 1} at batch {state.batch}" if state.batch else f"after epoch {state.epoch}"
    return f" (resumed {where} from {resumed.name})"
