"""Compare run folders: one row per run (``trainer runs``) and their validation-accuracy curves on one plot.

A run folder is any folder holding a ``config.yaml`` written by ``trainer fit``; its epochs come from
``metrics.csv`` (or the history inside ``checkpoints/last.pt``). A run that stopped before its planned
epochs is listed as interrupted, never an error.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainrig.training import checkpoint, choose
from trainrig.tracking import report
from trainrig.config.settings import upgrade
from trainrig.errors import ConfigError

IGNORED_KEYS = ("name", "out_dir")  # differ between any two runs; say nothing about the recipe
SORTS = {"started": lambda r: r.started, "name": lambda r: r.name, "best": lambda r: -(r.best_acc or -1),
         "test": lambda r: -(r.test_acc or -1),
         "time": lambda r: r.seconds, "epochs": lambda r: -r.epochs_done}


@dataclass(frozen=True)
class RunSummary:
    path: Path
    name: str
    started: float  # config.yaml's modification time (written when the run starts or resumes)
    epochs_done: int
    epochs_planned: int
    best_acc: float | None  # val_acc of the epoch checkpoint.monitor chose
    best_epoch: int | None
    test_acc: float | None  # eval.json: the chosen checkpoint's, read once (an old run: its last epoch's)
    seconds: float
    images_per_s: float | None
    history: list[dict] = field(repr=False, default_factory=list)
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    problem: str = ""  # a damaged file, named; the row shows what could still be read

    @property
    def status(self) -> str:
        if self.problem:
            return "damaged"
        if self.epochs_done == 0:
            return "no epochs"
        return "done" if self.epochs_done >= self.epochs_planned else f"interrupted ({self.epochs_done}/{self.epochs_planned})"

    @property
    def started_text(self) -> str:
        return dt.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


REQUIRED = ("epoch", "train_acc", "lr")  # what a row needs to be listed
_WHY = {TypeError: "a row is cut short or too long", ValueError: "a value is not a number",
        UnicodeDecodeError: "not text"}


def _history(folder: Path) -> tuple[list[dict], str]:
    """The run's epochs from metrics.csv, else from checkpoints/last.pt, and what was wrong on the way."""
    problem = ""
    if (folder / "metrics.csv").is_file():
        try:
            rows = report.read_metrics(folder / "metrics.csv")
            missing = [k for k in REQUIRED if any(k not in r for r in rows)]
            if missing:
                raise KeyError(f"no {missing[0]} column")
            return rows, ""
        except (ValueError, KeyError, TypeError, OSError) as exc:
            problem = f"metrics.csv damaged ({_WHY.get(type(exc), str(exc).strip(chr(39)))})"
    last = folder / "checkpoints" / "last.pt"
    if last.is_file():
        try:
            history = list(checkpoint.load(last, mmap=True).get("history", []))
            if all(isinstance(r, dict) and all(k in r for k in REQUIRED) for r in history):
                return history, problem
        except Exception:
            pass
        problem = problem or "checkpoints/last.pt unreadable"
    return [], problem


def _config(folder: Path) -> tuple[dict, str]:
    try:
        raw = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return {}, f"config.yaml unreadable ({type(exc).__name__})"
    if raw is not None and not isinstance(raw, dict):
        return {}, f"config.yaml is a {type(raw).__name__}, not a mapping"
    return raw or {}, ""


def _planned(raw: dict, done: int) -> int:
    epochs = raw.get("epochs", done)
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else done


def summarize(folder: Path) -> RunSummary:
    """One run's row; a damaged file (a metrics.csv cut mid-row, a config.yaml that is not a mapping) is
    named in ``problem`` and whatever else is readable is still listed."""
    raw, config_problem = _config(folder)
    history, history_problem = _history(folder)
    monitor = str((upgrade(raw).get("checkpoint") or {}).get("monitor") or "val_acc")
    best = choose.best_row(history, monitor)
    speeds = [r["images_per_s"] for r in history if "images_per_s" in r]
    return RunSummary(folder, folder.name, (folder / "config.yaml").stat().st_mtime, len(history),
                      _planned(raw, len(history)), best.get("val_acc") if best else None,
                      int(best["epoch"]) if best else None, _test_acc(folder, history),
                      sum(r.get("seconds", 0.0) for r in history),
                      sum(speeds) / len(speeds) if speeds else None, history,
                      {k: v for k, v in _flatten(raw).items() if not k.startswith("tune.")} if raw else {},
                      "; ".join(p for p in (config_problem, history_problem) if p))


def _test_acc(folder: Path, history: list[dict]) -> float | None:
    """eval.json's accuracy; a run from before validation splits: its last epoch's test_acc."""
    try:
        return float(json.loads((folder / "eval.json").read_text())["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    old = history and "val_acc" not in history[-1] and "test_acc" in history[-1]
    return float(history[-1]["test_acc"]) if old else None


PROBE = "PROBE"  # marks the folder of a probe (trainer lr-find, profile): a run built, never trained


def find(root: str | Path, depth: int = 3) -> list[Path]:
    """Run folders under ``root`` (itself included), at most ``depth`` levels down; probes' are not runs."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder (trainer runs [DIR], default runs/)")
    found = [root] if (root / "config.yaml").is_file() and not (root / PROBE).exists() else []
    if depth:
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if child.name not in ("checkpoints", "tensorboard", "wandb", "mlruns"):
                found += find(child, depth - 1)
    return found


def differing(summaries: list[RunSummary]) -> list[str]:
    """Config keys whose values are not the same in every listed run (in the config's order)."""
    readable = [s for s in summaries if s.config]  # a run whose config.yaml is damaged says nothing here
    keys = list(dict.fromkeys(k for s in readable for k in s.config))
    return [k for k in keys if k not in IGNORED_KEYS and len({repr(s.config.get(k)) for s in readable}) > 1]


def compare(root: str | Path = "runs", sort: str = "started", last: int | None = None) -> list[RunSummary]:
    if sort not in SORTS:
        raise ConfigError(f"--sort {sort!r}: expected one of {', '.join(SORTS)}")
    summaries = sorted((summarize(p) for p in find(root)), key=lambda s: s.started)
    if last:
        summaries = summaries[-last:]
    return sorted(summaries, key=SORTS[sort])


def plot(summaries: list[RunSummary], path: str | Path) -> Path:
    """Validation accuracy per epoch of every run, one line each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summaries:
        if s.history and "val_acc" in s.history[0]:
            ax.plot([r["epoch"] for r in s.history], [100 * r["val_acc"] for r in s.history], "-o", label=s.name)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    checkpoint.atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
