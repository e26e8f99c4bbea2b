"""Planning a run, once, before it trains: the resume request read once (``Resume``), then ``plan_run`` turns
(config, request) into the run's ``Plan`` - the config it trains with, its folder, the checkpoint it resumes
from, the warnings to show. Rank 0 plans and locks the folder (``claim``) and every rank gets its decision;
a launcher whose processes may start more than once (a restarting group, Ray Train) pins the folder first
(``pin``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from trainrig.training import checkpoint
from trainrig import config as config_mod
from trainrig.tracking import report
from trainrig.config import Config
from trainrig.errors import CheckpointError, ConfigError, TrainrigError
from trainrig.config.resume import mutated, resume_config
from trainrig.training.run import Held
from trainrig.training.runlock import RunInUse, RunLock
from trainrig.training.state import TrainState
from trainrig.parallel.base import Strategy


Resume = Literal["never", "auto", "strict"]  # start anew | continue if there is a checkpoint | must continue


def resume_request(cfg: Config, resume: bool | str) -> Resume:
    """The one reading of a resume request: ``fit(resume=...)`` / ``trainer fit --resume [auto]`` (True or
    "strict": the checkpoint must exist; "auto"; False or "never") over the config's ``resume`` key."""
    if resume is True or resume == "strict":
        return "strict"
    if resume not in (False, None, "never", "auto"):
        raise ConfigError(f"resume: {resume!r}: expected True, False, 'auto' or 'never'")
    return "auto" if "auto" in (resume, cfg.resume) else "never"


@dataclass(frozen=True)
class Plan:
    """A run before it trains: the config it trains with (its folder's name; a resumed run's recipe), its
    folder, the checkpoint it resumes from (None: from scratch) and the lines to show."""

    cfg: Config
    run_dir: Path
    resume_from: Path | None = None
    warnings: tuple[str, ...] = ()


def plan_run(cfg: Config, resume: Resume) -> Plan:
    """never: a new run folder. strict: the existing one and the config it was trained with (only ``epochs``
    and keys that do not change the result may differ: resume.resume_config). auto: strict when the folder
    has a checkpoint, else a fresh start in that folder (it holds no trained state). Resuming takes the
    newest readable checkpoint (returned with warnings about unreadable ones passed over)."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if resume != "never" and run_dir.exists() and not run_dir.is_dir():  # else each restart would start elsewhere
        raise ConfigError(f"--resume: {run_dir} is a file, not a run folder; move it or choose another name")
    folder = run_dir / "checkpoints"
    found = folder.is_dir() and any(folder.glob("*.pt"))
    if resume == "never" or (resume == "auto" and not found):
        if resume == "auto" and run_dir.is_dir():
            return Plan(cfg, run_dir)
        run_dir = report.new_run_dir(cfg.out_dir, cfg.name)
        return Plan(dataclasses.replace(cfg, name=run_dir.name), run_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {folder} (--resume auto starts the run when there is none)")
    saved, path, warnings = checkpoint.newest_readable(folder)
    trained = config_mod.from_dict(saved["config"])
    warnings = [f"warning: {w}" for w in warnings]
    changes = ", ".join(f"{k}={new!r} (was {old!r})" for k, (old, new) in mutated(trained, cfg).items())
    if changes:
        warnings.append(f"pbt: continuing {path.name} with {changes}, set in place")
    return Plan(resume_config(trained, cfg, int(saved["epoch"])), run_dir, path, tuple(warnings))


def pin(cfg: Config, resume: Resume) -> tuple[Config, Resume]:
    """Before processes that may start more than once (a spawned group with ``restarts``, Ray Train's
    workers): the folder is fixed here, so every start finds it - a new run's folder is made now and its
    processes continue it (auto); a strict resume is checked now, before anything starts."""
    if resume == "auto":
        return cfg, resume
    plan = plan_run(cfg, resume)
    return (plan.cfg, "auto") if resume == "never" else (cfg, resume)


def claim(cfg: Config, resume: Resume, held: list[Held]) -> Plan:
    """Rank 0: the run's plan (``plan_run``), its folder locked before its checkpoints are read (runlock.py); a
    fresh run that lost a race for a new folder takes the next name."""
    folder = Path(cfg.out_dir) / cfg.name
    lock = RunLock.acquire(folder) if resume != "never" and folder.is_dir() else None
    for _ in range(20):
        try:
            plan = plan_run(cfg, resume)
            lock = lock or RunLock.acquire(plan.run_dir)
        except RunInUse:
            if resume == "never":
                continue
            raise
        except BaseException:
            if lock:
                lock.release()
            raise
        held.append(lock)
        return dataclasses.replace(plan, warnings=(lock.note,) * bool(lock.note) + plan.warnings)
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


def resumed_how(state: TrainState, resumed: Path | None, resume: Resume) -> str:
    if resumed is None:
        return " (resume auto: no checkpoint yet, starting)" if resume == "auto" else ""
    where = f"epoch {state.epoch + 1} at batch {state.batch}" if state.batch else f"after epoch {state.epoch}"
    return f" (resumed {where} from {resumed.name})"
