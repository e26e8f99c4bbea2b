"""What a search leaves: trials.csv (one row per trial), trials.png (each trial's metric per epoch) and
best.yaml (a complete fit config, from the best trial's weights), marked partial when it was interrupted.
The trials are chosen on tune.metric (validation or training); the best trial's checkpoint alone is then
evaluated on the test set, once, and its test accuracy is written beside it (trials.csv, best.yaml)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainrig.training import choose
from trainrig import config as config_mod
from trainrig.training.checkpoint import atomic_write_text
from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.search.space import apply_params


@dataclass(frozen=True)
class TuneResult:
    experiment_dir: Path
    best_params: dict[str, Any]
    best_metrics: dict[str, Any]
    best_config_path: Path
    trials: list[dict]
    finished: int = 0  # trials that ran to their end (completed, stopped early or errored)
    expected: int = 0  # trials of the complete search

    @property
    def interrupted(self) -> bool:
        """The search was stopped (Ctrl-C) before every trial finished: its outputs are marked partial."""
        return self.finished < self.expected


def _unfinished(exp_dir: Path) -> set[str]:
    """Folder names of trials neither terminated nor errored (running or pending when the search was
    interrupted), as the experiment state Ray saved last says: in the returned grid Ray has already
    marked the trials it stopped on Ctrl-C as terminated."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(exp_dir)).trials
    except Exception:  # no state saved (nothing ran): nothing is unfinished
        return set()
    return {Path(t.path).name for t in trials if t.status not in ("TERMINATED", "ERROR")}


def _trial_rows(cfg: Config, grid: Any, exp_dir: Path) -> list[dict]:
    rows, unfinished = [], _unfinished(exp_dir)
    metric, better = cfg.tune.metric, (max if cfg.tune.mode == "max" else min)
    for result in grid:
        params = {k: v for k, v in (result.config or {}).items()}
        history = result.metrics_dataframe
        values = [] if history is None or metric not in history else [float(v) for v in history[metric]]
        epochs = int((result.metrics or {}).get("epoch") or len(values))  # the run's own count: PBT restores
        target = int(params.get("epochs", cfg.epochs))
        if result.path and Path(result.path).name in unfinished:
            reason = "interrupted"
        elif result.error is not None:
            reason = f"error: {str(result.error).strip().splitlines()[-1][:200]}"
        elif epochs >= target:
            reason = "completed"
        elif _early_stopped(cfg, history):
            reason = "stopped early by early_stopping"
        else:
            reason = f"stopped early by {cfg.tune.scheduler}"
        pbt = _pbt_history(exp_dir, _trial_id(result)) if cfg.tune.scheduler == "pbt" else {}
        rows.append({"trial": Path(result.path).name if result.path else "?", **{f"param:{k}": v for k, v in params.items()},
                     f"final_{metric}": values[-1] if values else float("nan"),
                     f"best_{metric}": better(values) if values else float("nan"),
                     "epochs_run": epochs, "stop_reason": reason, **pbt, "_curve": values})
    return rows


def _early_stopped(cfg: Config, history: Any) -> bool:
    """The trial's own early stopping ended it (the rule of choose.py on its reported rows)."""
    if history is None or cfg.early_stopping.monitor not in getattr(history, "columns", ()):
        return False
    return choose.stop_epoch(history.to_dict("records"), cfg.early_stopping) is not None


def _trial_id(result: Any) -> str | None:
    """The trial's id from its folder (``_trial_<id>_<n>_...``): a trial that continued from another's
    checkpoint in a reused worker may report the donor's ``trial_id`` in its metrics."""
    found = re.match(r"_trial_([0-9a-f]+_\d+)_", Path(result.path).name) if result.path else None
    return found.group(1) if found else (result.metrics or {}).get("trial_id")


def _pbt_history(exp_dir: Path, trial_id: str | None) -> dict[str, str]:
    """PBT's log of a trial (Ray's pbt_policy_<id>.txt: [trial, donor, epoch, donor epoch, donor config,
    new config] per exploit) as one column: which trial's checkpoint it continued from, and what changed."""
    path = exp_dir / f"pbt_policy_{trial_id}.txt"
    steps = []
    for line in (path.read_text().splitlines() if trial_id and path.is_file() else []):
        _, donor, epoch, _, donor_cfg, new_cfg = json.loads(line)
        changed = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in new_cfg.items() if donor_cfg.get(k) != v)
        steps.append(f"epoch {epoch}: from {donor.split('_')[0] if donor else '?'} ({changed})")
    return {"pbt_history": "; ".join(steps)}


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not k.startswith("_")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _plot(path: Path, rows: list[dict], metric: str, partial: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        curve = row["_curve"]
        style = "-o" if row["stop_reason"] == "completed" else "--x"
        ax.plot(range(1, len(curve) + 1), curve, style, label=f"{row['trial'][-12:]} ({row['stop_reason'][:20]})")
    ax.set(xlabel="epoch", ylabel=metric, title="trials (dashed: stopped early or errored)"
           + ("\n" + partial.split(";")[0] if partial else ""))
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _trial_weights(result: Any) -> str | None:
    """The last checkpoint Ray kept of a trial (its last.pt), when it is a local file."""
    found = Path(result.checkpoint.path) / "last.pt" if result.checkpoint is not None else None
    return str(found) if found is not None and found.is_file() else None


def _test_once(cfg: Config, weights: str | None) -> dict | None:
    """The best trial's checkpoint on the test set: the search's one reading of it."""
    if weights is None:
        return None
    from trainrig.trained.inference import evaluate_checkpoint

    return evaluate_checkpoint(weights, trust_class_path=bool(cfg.model.class_path))


def _write_best(cfg: Config, exp_dir: Path, best: Any, warm: str | None, test: dict | None,
                partial: str) -> tuple[dict, Path]:
    """best.yaml: the fit config of the best trial (from its weights: a warm start), its figures in the header."""
    params = dict(best.config)

    best_cfg = apply_params(cfg, params)
    best_cfg = dataclasses.replace(best_cfg, name=f"{cfg.tune.name}_best", out_dir="runs",
                                   tune=config_mod.TuneSettings(),
                                   model=dataclasses.replace(best_cfg.model, weights=warm or best_cfg.model.weights))
    best_path = exp_dir / "best.yaml"
    tested = f"; test accuracy of its checkpoint {test['test_acc']:.4f} (read once, after the choice)" if test else ""
    header = (f"# {partial}\n" if partial else "") + (f"# best trial of {exp_dir.name}: {cfg.tune.metric} "
              f"{best.metrics.get(cfg.tune.metric)}{tested} with {params}\n# trainer fit --config {best_path}\n")
    if warm:
        header += ("# model.weights: the trial's last checkpoint, so the fit goes on from its weights (warm start);"
                   " --set model.weights=null trains from scratch\n")
    atomic_write_text(best_path, header + config_mod.dump(best_cfg))
    return params, best_path


def summarise(cfg: Config, grid: Any, exp_dir: Path, expected: int = 0) -> TuneResult:
    rows = _trial_rows(cfg, grid, exp_dir)
    finished = sum(row["stop_reason"] != "interrupted" for row in rows)
    partial = (f"PARTIAL: search interrupted with {finished} of {expected} trials finished; "
               f"trainer tune --resume continues it") if finished < expected else ""
    exp_dir.mkdir(parents=True, exist_ok=True)
    try:
        best = grid.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="last")
    except RuntimeError:
        best = None
    found = best is not None and best.config is not None
    warm = _trial_weights(best) if found else None  # a warm start: the best trial's own last checkpoint
    test = _test_once(cfg, warm)
    for row in rows:
        row["test_acc"] = test["test_acc"] if test and best.path and row["trial"] == Path(best.path).name else ""
    _write_csv(exp_dir / "trials.csv", rows)
    _plot(exp_dir / "trials.png", rows, cfg.tune.metric, partial)
    (exp_dir / "PARTIAL").unlink(missing_ok=True)
    if partial:
        atomic_write_text(exp_dir / "PARTIAL", partial + "\n")
    if not found and partial:
        raise KeyboardInterrupt(partial)
    if not found:
        raise ConfigError(f"no trial of {exp_dir} reported {cfg.tune.metric}; see trials.csv")
    params, best_path = _write_best(cfg, exp_dir, best, warm, test, partial)
    metrics = {k: best.metrics.get(k) for k in ("val_acc", "val_loss", "epoch")}
    metrics["test_acc"] = test["test_acc"] if test else None
    return TuneResult(exp_dir, params, metrics, best_path, [{k: v for k, v in r.items() if not k.startswith("_")}
                                                            for r in rows], finished, expected or finished)
