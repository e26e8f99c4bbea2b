"""Smith's learning-rate range test (``trainer lr-find``, ``trainrig.lr_find``): before a long run, which lr?

The run is built as ``fit`` builds it (model, data, optimizer, precision, strategy: DDP included), in a fresh
folder ``<out_dir>/<name>-lr-find``. Then one optimizer step per batch with the lr rising exponentially from
``min_lr`` to ``max_lr`` (every parameter group keeps its ratio to the top one: layer-wise decay holds), the
training loss of each step averaged over ranks (so every rank takes the same decisions), stopped early once
the smoothed loss passes 4x its lowest. Afterwards the model's weights and buffers are put back as they were;
the optimizer and batches were the sweep's own. Nothing reads the validation or the test set.

The suggestion is fastai's "valley" rule: the longest stretch of the smoothed curve over which the loss keeps
falling, and the lr two thirds of the way down it (steep enough to learn fast, short of where it turns up).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from trainrig import config as config_mod
from trainrig.config import Config
from trainrig.errors import ConfigError, TrainrigError
from trainrig.parallel import DistEnv
from trainrig.preflight.probe import batches, probe
from trainrig.training.checkpoint import atomic_write_bytes, atomic_write_text
from trainrig.training.run import Run
from trainrig.training.setup import UserParts

DIVERGED = 4.0  # the sweep stops once the smoothed loss exceeds this multiple of its lowest (Lightning's default)
BETA = 0.98  # smoothing of the loss curve (fastai's and Lightning's)


@dataclass(frozen=True)
class Sweep:
    steps: int = 100
    min_lr: float = 1e-7
    max_lr: float = 10.0

    def lr(self, i: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (i / max(self.steps - 1, 1))


@dataclass(frozen=True)
class LRFindResult:
    """The sweep: each step's lr (for ``optim.lr``, the top parameter group), raw and smoothed training loss."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    run_dir: Path
    plot: Path  # lr_find.png: loss against lr, the suggestion marked
    config: Path | None  # apply=True: the config with optim.lr set to the suggestion, ready for trainer fit


def lr_find(cfg: Config, *, steps: int = 100, min_lr: float = 1e-7, max_lr: float = 10.0, apply: bool = False,
            model: nn.Module | None = None, train_data: Any = None, test_data: Any = None,
            val_data: Any = None) -> LRFindResult | None:
    """The range test on ``cfg`` (and the caller's own network and data, as ``fit`` takes them); rank 0's
    result (None on other ranks under torchrun). ``model`` is left with the weights it came with."""
    if steps < 5 or not 0 < min_lr < max_lr:
        raise ConfigError(f"lr-find: need steps >= 5 and 0 < min_lr < max_lr, got steps={steps}, "
                          f"min_lr={min_lr}, max_lr={max_lr}")
    return probe(cfg, "lr-find", UserParts(model, train_data, test_data, val_data),
                 functools.partial(_find, cfg, Sweep(steps, min_lr, max_lr), apply))


def _find(cfg: Config, sweep: Sweep, apply: bool, run: Run, env: DistEnv) -> LRFindResult | None:
    lrs, losses = _sweep(run, sweep)
    smoothed = smooth(losses)
    suggestion = valley(lrs, smoothed)
    at = lrs.index(suggestion)  # every rank saw the same averaged losses; checked, not assumed
    if run.strategy.min_over_ranks(at) != -run.strategy.min_over_ranks(-at):
        raise RuntimeError(f"lr-find: the ranks suggested different learning rates (this rank {suggestion:.3g})")
    return _write(run, cfg, lrs, losses, smoothed, suggestion, apply) if env.is_main else None


def _sweep(run: Run, sweep: Sweep) -> tuple[list[float], list[float]]:
    optimizer, world = run.state.optimizer, run.strategy.env.world_size
    top = max(run.state.scheduler.base_lrs)
    ratios = [base / top for base in run.state.scheduler.base_lrs]
    run.model.train()
    lrs: list[float] = []
    losses: list[float] = []
    lowest, average = math.inf, 0.0
    for i, (x, y) in zip(range(sweep.steps), batches(run)):
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = sweep.lr(i) * ratio
        loss = run.stepper.step(x, y)
        if loss is None:  # redone in smaller micro-batches after an OOM: its update is applied all the same
            continue
        value = run.strategy.reduce([float(loss)])[0] / world  # every rank decides on the same figure
        average = BETA * average + (1 - BETA) * value
        debiased = average / (1 - BETA ** (len(losses) + 1))
        if not math.isfinite(value) or debiased > DIVERGED * lowest:
            break
        lrs.append(sweep.lr(i))
        losses.append(value)
        lowest = min(lowest, debiased)
    run.stepper.finish()
    return lrs, losses


def smooth(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """Exponential moving average, debiased (the first points are not pulled toward 0)."""
    out, average = [], 0.0
    for i, value in enumerate(losses, 1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** i))
    return out


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's valley: the longest decreasing run of ``losses`` (a longest decreasing subsequence), and the
    lr two thirds of the way along it."""
    if len(losses) < 3:
        raise TrainrigError(f"lr-find: the loss diverged within {len(losses)} steps of min_lr={lrs[0] if lrs else '?'}"
                            f": start lower (--min-lr)")
    n = len(losses)
    length = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
        if length[i] > length[end]:
            end, start = i, i - length[i]
    third = (end - start) / 3
    return lrs[min(n - 1, start + int(third) + int(third / 2))]


def _write(run: Run, cfg: Config, lrs: list[float], losses: list[float], smoothed: list[float],
           suggestion: float, apply: bool) -> LRFindResult:
    """lr_find.csv, lr_find.png and (``apply``) lr_find.yaml: ``cfg`` with optim.lr = the suggestion."""
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["lr", "loss", "smoothed"])
    writer.writerows((f"{lr:.6g}", f"{loss:.6g}", f"{s:.6g}") for lr, loss, s in zip(lrs, losses, smoothed))
    atomic_write_text(run.run_dir / "lr_find.csv", rows.getvalue())
    plot = plot_lr_find(run.run_dir / "lr_find.png", lrs, losses, smoothed, suggestion)
    config = None
    if apply:
        lr = float(f"{suggestion:.3g}")
        config = run.run_dir / "lr_find.yaml"
        applied = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
        atomic_write_text(config, config_mod.dump(applied))
    run.log(f"lr-find: {len(lrs)} steps from lr {lrs[0]:.3g} to {lrs[-1]:.3g}; suggestion {suggestion:.3g} "
            f"(valley rule; the config has {cfg.optim.lr:.3g}); {plot}")
    return LRFindResult(lrs, losses, smoothed, suggestion, run.run_dir, plot, config)


def plot_lr_find(path: Path, lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 suggestion: float) -> Path:
    """Training loss against lr (log scale): each step's, smoothed, and the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="0.75", lw=1, label="loss of each step")
    ax.plot(lrs, smoothed, lw=2, label="smoothed")
    at = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggestion)))
    ax.plot([suggestion], [smoothed[at]], "o", color="red", ms=9, label=f"suggestion {suggestion:.3g}")
    ax.axvline(suggestion, color="red", ls=":", lw=1)
    top = min(max(smoothed), 2.5 * smoothed[0]) if smoothed else 1.0
    ax.set(xscale="log", xlabel="learning rate (optim.lr)", ylabel="training loss", title="learning-rate range test",
           ylim=(min(smoothed) * 0.9 if smoothed else 0.0, top * 1.05))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
