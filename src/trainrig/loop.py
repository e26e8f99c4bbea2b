"""The training loop: ``fit(cfg)`` is the one entry point for the CLI, tuning, tests and notebooks."""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import checkpoint, config as config_mod, data, distributed, memory, models, report
from .config import Config, OptimConfig, SchedConfig
from .errors import CheckpointError, ConfigError, TrainrigError
from .models.parallel import StagedResNet
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
    param_checksums: list[float] = dataclasses.field(default_factory=list)  # one per rank


# ----------------------------------------------------------------------------- optimizer and schedule

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda groups, c, **kw: torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay, **kw),
    "adamw": lambda groups, c, **kw: torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay, **kw),
    "sgd": lambda groups, c, **kw: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                                   weight_decay=c.weight_decay, **kw),
}


# fused SGD with momentum fails once frozen parameters start getting gradients (gradual unfreezing):
# its momentum buffers are None for them (torch 2.14), so SGD stays on the foreach kernel
_FUSED = ("adam", "adamw")


def build_optimizer(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer, fused into one kernel where this torch supports it for the device
    (measured on a 2-core CPU: AdamW step of ResNet18 at batch 128 went from 1.99 s to 1.49 s)."""
    if c.name not in _FUSED:
        return _OPTIMIZERS[c.name](groups, c)
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

Reduce = Callable[[Sequence[float]], list[float]]


def _local(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


_AMP_DTYPES: dict[str, torch.dtype | None] = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def _no_agreement(flag: bool) -> bool:
    return flag


def _autocast(device_type: str, precision: str) -> torch.autocast:
    """Autocast for ``precision`` (disabled at "32"): the forward passes of training, evaluation and the
    batch-size probe all run under the same one."""
    dtype = _AMP_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _totals(reduce: Reduce, loss_sum: torch.Tensor | None, correct: torch.Tensor | None,
            seen: int) -> tuple[float, float, int]:
    """Mean loss, accuracy and sample count over every rank; the one device sync of an epoch."""
    total_loss, total_correct, total_seen = reduce([
        0.0 if loss_sum is None else loss_sum.item(), 0 if correct is None else correct.item(), seen])
    return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1), int(total_seen)


def train_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module,
                progress: Progress, reduce: Reduce = _local, *, micro: memory.MicroBatcher | None = None,
                precision: str = "32", scaler: torch.amp.GradScaler | None = None,
                agree: Callable[[bool], bool] = _no_agreement,
                sync_grads: Callable[[nn.Module], None] | None = None) -> dict[str, float]:
    """One pass over the training batches. Running sums stay on the device; floats come out at the end
    (summed over ranks by ``reduce`` under DDP). Each step runs through ``micro`` (memory.MicroBatcher),
    which splits the batch into micro-batches after an OOM; ``precision`` picks autocast, ``scaler`` the
    fp16 loss scaling."""
    device_type = next(model.parameters()).device.type
    micro = micro or memory.MicroBatcher(micro=2 ** 62)
    scaler = scaler or torch.amp.GradScaler(device_type, enabled=False)

    def forward(xc: torch.Tensor, yc: torch.Tensor, weight: float) -> tuple:
        with _autocast(device_type, precision):
            logits = model(xc)
        yc = yc.to(logits.device, non_blocking=True)  # model parallel: logits come from the last stage
        loss = loss_fn(logits.float(), yc)
        scaled = loss if weight == 1 else loss * weight
        return scaled, loss.detach() * yc.shape[0], (logits.detach().argmax(1) == yc).sum()

    def zero_grad() -> None:
        optimizer.zero_grad(set_to_none=True)

    loss_sum = correct = None
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        zero_grad()
        batch_loss, batch_correct = micro.run(x, y, forward, lambda scaled: scaler.scale(scaled).backward(),
                                              zero_grad, agree, lambda: distributed.Context.no_sync(model))
        if sync_grads is not None:
            sync_grads(model)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        seen += y.shape[0]
        progress.batch(step, batch_loss.item() / y.shape[0] if progress.wants_loss(step) else None)
    loss, acc, total_seen = _totals(reduce, loss_sum, correct, seen)
    elapsed = time.perf_counter() - start  # .item() in _totals waited for the device
    return {"train_loss": loss, "train_acc": acc, "images_per_s": total_seen / max(elapsed, 1e-9)}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, reduce: Reduce = _local, *,
             precision: str = "32") -> dict[str, float]:
    """Test loss and accuracy over every sample exactly once (summed over ranks), no autograd graph built,
    under the same autocast as training."""
    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    loss_sum = correct = None
    seen = 0
    for x, y in batches:
        with _autocast(device_type, precision):
            logits = model(x)
        y = y.to(logits.device, non_blocking=True)
        batch_loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        batch_correct = (logits.argmax(1) == y).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        seen += y.shape[0]
    model.train(was_training)
    loss, acc, total_seen = _totals(reduce, loss_sum, correct, seen)
    return {"test_loss": loss, "test_acc": acc, "test_samples": total_seen}


# ----------------------------------------------------------------------------- fit

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _run_dir(cfg: Config, resume: bool) -> tuple[Config, Path]:
    if resume:
        run_dir = Path(cfg.out_dir) / cfg.name
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CheckpointError(f"--resume: no checkpoint at {run_dir / 'checkpoints' / 'last.pt'}")
        return cfg, run_dir
    run_dir = report.new_run_dir(cfg.out_dir, cfg.name)
    return dataclasses.replace(cfg, name=run_dir.name), run_dir


def _main_decides(ctx: distributed.Context, decide: Callable[[], Any]) -> Any:
    """Rank 0 runs ``decide`` (e.g. picks the run folder) and every rank gets its result or its error."""
    outcome: Any = None
    if ctx.env.is_main:
        try:
            outcome = ("ok", decide())
        except TrainrigError as exc:
            outcome = ("error", exc)
    status, value = ctx.broadcast_object(outcome)
    if status == "error":
        raise value
    return value


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, epoch: int,
                    history: list[dict], cfg: Config) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "history": history, "config": config_mod.to_dict(cfg), "rng": checkpoint.rng_state()}


def _build_model(cfg: Config, ctx: distributed.Context) -> nn.Module:
    model = models.build_model(cfg.model, seed=cfg.seed)
    if cfg.grad_checkpointing:
        models.enable_grad_checkpointing(model)
    if ctx.stage_devices:
        try:
            model = StagedResNet(model, cfg.split_at, ctx.stage_devices, cfg.split_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    else:
        model = model.to(ctx.device)
    return model.to(memory_format=torch.channels_last) if cfg.model.channels_last else model


def _preflight(cfg: Config, splits: data.Splits) -> None:
    """Checks on the host before the first step: on a GPU these fail later as a device-side assert."""
    labels = torch.cat([splits.train_labels, splits.test_labels])
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.model.num_classes):
        raise ConfigError(f"labels go up to {int(labels.max())} but model.num_classes={cfg.model.num_classes}: "
                          f"labels must lie in [0, model.num_classes)")
    channels = 1 if splits.train_images.ndim == 3 else int(splits.train_images.shape[1])
    if channels != cfg.model.in_channels:
        raise ConfigError(f"model.in_channels={cfg.model.in_channels} but the images have {channels} channel"
                          f"{'s' if channels != 1 else ''}; set model.in_channels={channels}")


def _auto_batch_size(cfg: Config, ctx: distributed.Context, model: nn.Module, splits: data.Splits,
                     resumed_run: Path | None, log: Callable[[str], None]) -> Config:
    """batch_size: auto -> the largest per-rank batch a real forward+backward+step survives, less the margin,
    agreed (minimum) over ranks; the global size goes into the run's config. A resumed run keeps its size."""
    if resumed_run is not None:
        saved = config_mod.load(resumed_run / "config.yaml").data.batch_size
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=saved))
    simulate = cfg.debug.simulate_oom_above if cfg.debug.simulate_oom_rank in (None, ctx.env.rank) else None
    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def try_step(size: int) -> None:
        memory.check_simulated(size, simulate)
        optimizer = build_optimizer(models.param_groups(model, cfg.model, cfg.optim.lr), cfg.optim)
        x, y = data.sample_batch(splits, size, ctx.device, cfg.model.channels_last)
        with _autocast(ctx.device.type, cfg.precision):
            logits = model(x)
        loss_fn(logits.float(), y.to(logits.device)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        per_rank = memory.find_batch_size(try_step, limit=max(2, len(splits.train_labels) // ctx.env.world_size),
                                          margin=cfg.data.auto_batch_margin, log=log)
    finally:
        model.load_state_dict(snapshot)
    per_rank = ctx.min_over_ranks(per_rank)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=per_rank * ctx.env.world_size))


def _inject_failure(batches: Iterable, rank: int) -> Iterator:
    """debug.fail_on_rank: this rank raises at its first training step (tests that peers do not hang)."""
    for _ in batches:
        raise RuntimeError(f"injected failure on rank {rank} (debug.fail_on_rank)")
    yield from ()


def fit(cfg: Config, *, resume: bool = False, progress: ProgressMode | Progress = "auto",
        on_epoch: Callable[[dict, Path], None] | None = None) -> FitResult | None:
    """Train ``cfg`` from scratch (or from its last checkpoint with ``resume``) and return the metrics.

    The strategy decides the processes (distributed.launch); each runs the same epochs: train, evaluate
    under inference mode, and on rank 0 append a row of floats to metrics.csv, save last.pt (and best.pt
    when test accuracy improves) atomically, redraw curves.png and call ``on_epoch``. Returns rank 0's
    result (None on the other ranks of a torchrun launch).
    """
    return distributed.launch(cfg, functools.partial(_fit_worker, cfg, resume, progress, on_epoch))


def _fit_worker(cfg: Config, resume: bool, progress: ProgressMode | Progress,
                on_epoch: Callable[[dict, Path], None] | None, ctx: distributed.Context) -> FitResult | None:
    started = time.perf_counter()
    env, main = ctx.env, ctx.env.is_main
    torch.set_num_threads(distributed.default_threads(cfg, env.local_world_size))
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg, run_dir = _main_decides(ctx, lambda: _run_dir(cfg, resume))
    _seed_everything(cfg.seed)
    bar = progress if isinstance(progress, Progress) else make_progress(progress if main else "off")

    splits = data.load_splits(cfg.data, cfg.seed)
    _preflight(cfg, splits)
    model = _build_model(cfg, ctx)  # unwrapped: its state_dict is what checkpoints hold
    if cfg.data.batch_size == "auto":
        cfg = _auto_batch_size(cfg, ctx, model, splits, run_dir if resume else None, bar.message)
    train_batches, test_batches, _ = data.build(cfg.data, device=ctx.device, seed=cfg.seed, rank=env.rank,
                                                world=env.world_size, channels_last=cfg.model.channels_last,
                                                splits=splits)
    optimizer = build_optimizer(models.param_groups(model, cfg.model, cfg.optim.lr), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor_fn(cfg.sched, cfg.epochs, max(1, len(train_batches))))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "16-mixed")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    simulate = cfg.debug.simulate_oom_rank in (None, env.rank)
    micro = memory.MicroBatcher(micro=train_batches.batch_size, log=bar.message,
                                simulate_above=cfg.debug.simulate_oom_above if simulate else None)

    history: list[dict] = []
    first_epoch = 0
    if resume:
        state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        history, first_epoch = list(state["history"]), int(state["epoch"])
    if main:
        checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))

    where = ", ".join(map(str, ctx.stage_devices)) if ctx.stage_devices else str(ctx.device)
    bar.message(f"run folder: {run_dir}  strategy: {ctx.strategy} x{env.world_size}  device: {where}  "
                f"train/test images: {len(splits.train_labels)}/{len(splits.test_labels)}")
    new_layers = models.new_layer_names(cfg.model.in_channels)
    best_acc = max((row["test_acc"] for row in history), default=-1.0)
    stages, net = None, model
    bar.start(cfg.epochs, first_epoch)
    try:
        for epoch in range(first_epoch, cfg.epochs):
            epoch_start = time.perf_counter()
            model.train()
            now = models.unfrozen_stages(cfg.model.finetune, epoch, cfg.model.unfreeze_every)
            models.apply_unfrozen(model, now, new_layers)
            if now != stages:  # DDP registers the trainable parameters when it wraps: rewrap on change
                stages, net = now, distributed.wrap(model, ctx)
            train_batches.set_epoch(epoch)
            fail = cfg.debug.fail_on_rank == env.rank and cfg.debug.fail_at_epoch == epoch
            batches = _inject_failure(train_batches, env.rank) if fail else train_batches
            bar.start_epoch(epoch + 1, len(train_batches))
            lr = optimizer.param_groups[0]["lr"]
            with memory.explain_cuda_errors():
                row = {"epoch": epoch + 1, "lr": lr,
                       **train_epoch(net, batches, optimizer, scheduler, loss_fn, bar, ctx.all_reduce_sum, micro=micro,
                                     precision=cfg.precision, scaler=scaler, agree=ctx.agree_any,
                                     sync_grads=ctx.all_reduce_grads)}
                ctx.sync_buffers(model)
                row.update(evaluate(net, test_batches, ctx.all_reduce_sum, precision=cfg.precision))
            row["seconds"] = time.perf_counter() - epoch_start
            history.append(row)
            if main:
                state = _training_state(model, optimizer, scheduler, epoch + 1, history, cfg)
                state["scaler"] = scaler.state_dict()
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
    checksums = ctx.gather_checksums(model)  # DDP ranks must end with the same weights
    if len(set(checksums)) > 1:
        raise RuntimeError(f"parameters diverged across ranks: checksums {checksums}")
    if not main:
        return None
    best = max(history, key=lambda r: r["test_acc"]) if history else {"epoch": 0, "test_acc": float("nan")}
    return FitResult(cfg, run_dir, history, int(best["epoch"]), float(best["test_acc"]),
                     time.perf_counter() - started, checksums)


def evaluate_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Rebuild the model stored in a checkpoint and evaluate it on its config's test set."""
    state = checkpoint.load(path)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a trainrig checkpoint (needs 'config' and 'model')")
    cfg = config_mod.load(raw=state["config"], overrides=overrides)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None))
    device = distributed.resolve_device(cfg.device)
    torch.set_num_threads(distributed.default_threads(cfg, 1))
    _, test_batches, _ = data.build(cfg.data, device=device, seed=cfg.seed, channels_last=cfg.model.channels_last)
    model = models.build_model(cfg.model).to(device)
    model.load_state_dict(models.strip_prefixes(state["model"]))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return {"epoch": int(state.get("epoch", 0)), **evaluate(model, test_batches, precision=cfg.precision)}
