"""The run folder's files: metrics.csv (one row per epoch), curves.png, and the test report's pictures
(confusion.png, mistakes.png); report.html is page.py's."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from trainrig.training.checkpoint import atomic_write_bytes, atomic_write_text
from trainrig.errors import ConfigError

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                  "images_per_s", "seconds")  # test_*: eval.test_every_epoch (a curve no choice reads)


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
    columns = [c for c in METRIC_COLUMNS if any(c in row for row in history)] or list(METRIC_COLUMNS)
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
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
    """Loss and accuracy per epoch (train, validation, and test when eval.test_every_epoch measured it, marked
    as read by no choice), as curves.png beside metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style, label in (("train", "-o", "train"), ("val", "-s", "validation"),
                                ("test", ":^", "test (no choice reads it)")):
        if not history or f"{split}_loss" not in history[0]:
            continue
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=label)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], style, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, run_dir / "curves.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def plot_confusion(path: Path, confusion: list[list[int]], classes: list[str], title: str = "") -> Path:
    """The confusion matrix normalised per true class (rows sum to 1), class names on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n + 2), max(4, 0.6 * n + 1.5)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title or "confusion (per true class)")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    if n > 20:  # no numbers in the cells: a colour scale instead
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_mistakes(path: Path, images: list[Any], mistakes: list[dict], classes: list[str]) -> Path:
    """The highest-loss images in one grid (one axes: fast), each labelled true / predicted (confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from torchvision.utils import make_grid

    tiles = []
    for image in images:
        x = image.float()
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
        tiles.append(x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1))
    side = max(t.shape[-1] for t in tiles)
    tiles = [torch.nn.functional.interpolate(t[None], size=(side, side))[0] for t in tiles]
    cols, pad = min(8, len(tiles)), max(4, side // 3)  # room above each tile for its label
    grid = make_grid(tiles, nrow=cols, padding=pad, pad_value=1.0).permute(1, 2, 0).numpy()
    rows = -(-len(tiles) // cols)
    fig, ax = plt.subplots(figsize=(1.6 * cols, 1.9 * rows + 0.4))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    step = side + pad
    for i, m in enumerate(mistakes):
        ax.text(pad + (i % cols) * step, pad + (i // cols) * step - 1,
                f"{classes[m['label']]} -> {classes[m['predicted']]} {100 * m['confidence']:.0f}%", fontsize=6,
                va="bottom", color="firebrick" if m["label"] != m["predicted"] else "black")
    ax.set_title("highest-loss test images: true -> predicted (confidence)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
