"""The training loop: ``fit(cfg)`` is the one entry point for the CLI, tuning, tests and notebooks."""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import checkpoint, config as config_mod, data, models, report
from .config import Config, OptimConfig, SchedConfig
from .distributed import DistEnv, resolve_device
from .errors import CheckpointError, ConfigError
from .progress import Progress, ProgressMode, make_progress


@dataclass(frozen=True)
class FitResult:
    """What a run produced: per-epoch metrics (floats only), the best epoch and where files went."""

    config: Config
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best_test_acc: float
    seconds: float

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------- optimizer and schedule

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda groups, c, **kw: torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay, **kw),
    "adamw": lambda groups, c, **kw: torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay, **kw),
    "sgd": lambda groups, c, **kw: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                                   weight_decay=c.weight_decay, **kw),
}


def build_optimizer(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer, fused into one kernel where this torch supports it for the device
    (measured on a 2-core CPU: AdamW step of ResNet18 at batch 128 went from 1.99 s to 1.49 s)."""
    try:
        return _OPTIMIZERS[c.name](groups, c, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or no fused kernel for this device/dtype
        return _OPTIMIZERS[c.name](groups, c)


def _cosine(c: SchedConfig, total: int, per_epoch: int) -> Callable[[int], float]:
    warm = int(c.warmup_epochs * per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _onecycle(c: SchedConfig, total: int, per_epoch: int) -> Callable[[int], float]:
    """Linear rise from peak/div_factor to the peak, then cosine down to initial/final_div_factor."""
    rise = max(1, int(c.pct_start * total))
    start, end = 1 / c.div_factor, 1 / (c.div_factor * c.final_div_factor)

    def factor(step: int) -> float:
        if step < rise:
            return start + (1 - start) * step / rise
        t = min(1.0, (step - rise) / max(1, total - rise))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


_SCHEDULES: dict[str, Callable[[SchedConfig, int, int], Callable[[int], float]]] = {
    "none": lambda c, total, per_epoch: (lambda step: 1.0),
    "cosine": _cosine,
    "step": lambda c, total, per_epoch: (lambda step: c.gamma ** ((step // per_epoch) // c.step_size)),
    "onecycle": _onecycle,
}


def lr_factor_fn(c: SchedConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule as a pure function of the optimizer step (stepped once per batch)."""
    return _SCHEDULES[c.name](c, epochs * steps_per_epoch, steps_per_epoch)


# ----------------------------------------------------------------------------- epochs

def train_epoch(model: nn.Module, batches: data.Batches, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module,
                progress: Progress) -> dict[str, float]:
    """One pass over the training batches. Running sums stay on the device; floats come out at the end."""
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        progress.batch(step, loss.item() if progress.wants_loss(step) else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9)}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: data.Batches) -> dict[str, float]:
    """Test loss and accuracy over every sample once, no autograd graph built."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
    model.train(was_training)
    return {"test_loss": loss_sum.item() / max(seen, 1), "test_acc": correct.item() / max(seen, 1),
            "test_samples": seen}


# ----------------------------------------------------------------------------- fit

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _device(cfg: Config, env: DistEnv) -> torch.device:
    try:
        device = resolve_device(cfg.device, env)
    except RuntimeError as exc:
        raise ConfigError(f"device: {cfg.device!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} asked for CUDA but no CUDA device is available; use auto or cpu")
    return device


def _run_dir(cfg: Config, resume: bool) -> tuple[Config, Path]:
    if resume:
        run_dir = Path(cfg.out_dir) / cfg.name
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CheckpointError(f"--resume: no checkpoint at {run_dir / 'checkpoints' / 'last.pt'}")
        return cfg, run_dir
    run_dir = report.new_run_dir(cfg.out_dir, cfg.name)
    return dataclasses.replace(cfg, name=run_dir.name), run_dir


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, epoch: int,
                    history: list[dict], cfg: Config) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "history": history, "config": config_mod.to_dict(cfg), "rng": checkpoint.rng_state()}


def fit(cfg: Config, *, resume: bool = False, progress: ProgressMode | Progress = "auto",
        on_epoch: Callable[[dict, Path], None] | None = None) -> FitResult:
    """Train ``cfg`` from scratch (or from its last checkpoint with ``resume``) and return the metrics.

    Each epoch: train, evaluate under inference mode, append a row of floats to metrics.csv, save
    last.pt (and best.pt when test accuracy improves) atomically, redraw curves.png, call ``on_epoch``.
    """
    started = time.perf_counter()
    env = DistEnv.from_environ()
    device = _device(cfg, env)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg, run_dir = _run_dir(cfg, resume)
    _seed_everything(cfg.seed)

    train_batches, test_batches, splits = data.build(cfg.data, device=device, seed=cfg.seed, rank=env.rank,
                                                     world=env.world_size, channels_last=cfg.model.channels_last)
    if cfg.model.num_classes < splits.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has {splits.num_classes} classes")
    model = models.build_model(cfg.model, seed=cfg.seed).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(models.param_groups(model, cfg.model, cfg.optim.lr), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor_fn(cfg.sched, cfg.epochs, max(1, len(train_batches))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    history: list[dict] = []
    first_epoch = 0
    if resume:
        state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        history, first_epoch = list(state["history"]), int(state["epoch"])
    checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))

    bar = progress if isinstance(progress, Progress) else make_progress(progress)
    bar.message(f"run folder: {run_dir}  device: {device}  train/test images: "
                f"{train_batches.num_samples}/{test_batches.num_samples}")
    new_layers = models.new_layer_names(cfg.model.in_channels)
    best_acc = max((row["test_acc"] for row in history), default=-1.0)
    bar.start(cfg.epochs, first_epoch)
    try:
        for epoch in range(first_epoch, cfg.epochs):
            epoch_start = time.perf_counter()
            model.train()
            models.apply_unfrozen(model, models.unfrozen_stages(cfg.model.finetune, epoch,
                                                                cfg.model.unfreeze_every), new_layers)
            train_batches.set_epoch(epoch)
            bar.start_epoch(epoch + 1, len(train_batches))
            lr = optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch + 1, **train_epoch(model, train_batches, optimizer, scheduler, loss_fn, bar),
                   **evaluate(model, test_batches), "lr": lr}
            row["seconds"] = time.perf_counter() - epoch_start
            history.append(row)
            state = _training_state(model, optimizer, scheduler, epoch + 1, history, cfg)
            checkpoint.save(run_dir / "checkpoints" / "last.pt", state)
            if row["test_acc"] > best_acc:
                best_acc = row["test_acc"]
                checkpoint.save(run_dir / "checkpoints" / "best.pt", state)
            report.write_metrics(run_dir, history)
            report.plot_curves(run_dir, history, title=cfg.name)
            bar.end_epoch(row)
            if on_epoch is not None:
                on_epoch(row, run_dir)
    finally:
        bar.close()
    best = max(history, key=lambda r: r["test_acc"]) if history else {"epoch": 0, "test_acc": float("nan")}
    return FitResult(cfg, run_dir, history, int(best["epoch"]), float(best["test_acc"]),
                     time.perf_counter() - started)


def evaluate_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Rebuild the model stored in a checkpoint and evaluate it on its config's test set."""
    state = checkpoint.load(path)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a trainrig checkpoint (needs 'config' and 'model')")
    cfg = config_mod.load(raw=state["config"], overrides=overrides)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None))
    device = _device(cfg, DistEnv())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _, test_batches, _ = data.build(cfg.data, device=device, seed=cfg.seed, channels_last=cfg.model.channels_last)
    model = models.build_model(cfg.model).to(device)
    model.load_state_dict(models.strip_prefixes(state["model"]))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return {"epoch": int(state.get("epoch", 0)), **evaluate(model, test_batches)}
