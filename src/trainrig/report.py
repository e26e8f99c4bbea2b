"""The run folder: config.yaml, metrics.csv (one row per epoch) and curves.png."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .checkpoint import atomic_write_bytes, atomic_write_text
from .errors import ConfigError

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s", "seconds")


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``... when that folder already holds a run: never overwrite."""
    base = Path(out_dir)
    if base.exists() and not base.is_dir():
        raise ConfigError(f"out_dir={base}: is a file, not a folder")
    candidate, n = base / name, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base / f"{name}-{n}"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out_dir={base}: cannot create the run folder {candidate} ({exc.strerror or exc})") from None
    return candidate


def write_metrics(run_dir: Path, history: list[dict]) -> Path:
    """Rewrite metrics.csv from the whole history (so a resumed run's file matches an uninterrupted one)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    path = run_dir / "metrics.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(run_dir: Path, history: list[dict], title: str = "") -> Path:
    """Loss and accuracy per epoch, train and test, as curves.png beside metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=split)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = run_dir / "curves.png"
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
