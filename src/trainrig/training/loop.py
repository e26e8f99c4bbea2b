"""The training loop: ``fit(cfg)`` is the one entry point for the CLI, tuning, tests and notebooks.

``fit`` launches the strategy's processes (launch.py); each runs ``_fit_worker``, which reads top to
bottom: set up the run, then per epoch train, evaluate and hand the row to the callbacks. Everything
optional (progress, curves.png, checkpoints, loggers, Tune reporting, the user's) is a callback.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from trainrig.training import callbacks as cb, checkpoint, choose, evaluation, memory
from trainrig import config as config_mod, data, models
from trainrig.tracking import report
from trainrig.training.batch_size import auto_batch_size
from trainrig.training.builtin import builtin
from trainrig.training.callbacks import Callback, Hooks
from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.training.plan import claim, main_decides, resume_mode, resumed_how, run_folder
from trainrig.training.progress import Progress, ProgressMode
from trainrig.training.runlock import RunLock
from trainrig.training.state import TrainState
from trainrig.training.step import Stepper, eval_logits
from trainrig.parallel import DistEnv, Strategy, default_threads, launch, make_strategy, strategy_class


@dataclass(frozen=True)
class FitResult:
    """What a run produced: per-epoch metrics (floats only), the epoch checkpoint.monitor chose (on validation)
    with its val_acc, the test figures of that checkpoint (evaluated once, at the end; NaN with eval.test
    false), and where files went."""

    config: Config
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_acc: float  # val_acc of the chosen epoch (NaN without a validation split)
    test_acc: float
    test_loss: float
    seconds: float
    param_checksums: list[float] = dataclasses.field(default_factory=list)  # one per rank
    test: dict | None = None  # eval.json: per-class figures, confusion matrix, calibration, mistakes
    stopped_early: int | None = None  # the epoch early_stopping ended the run after


@dataclass
class Run:
    """What callbacks see of a run in a worker process."""

    cfg: Config
    run_dir: Path
    strategy: Strategy
    model: nn.Module  # unwrapped: its state_dict is what checkpoints hold
    hooks: Hooks
    splits: data.Splits
    state: TrainState | None = None
    train: Any = None  # this rank's training batches
    val: Any = None  # None without a validation split
    test: Any = None
    trainable: tuple[str, ...] | None = None  # backbone stages the wrapped model trains
    layout: models.Layout | None = None  # new layers and backbone stages of the model
    stepper: Stepper | None = None  # the optimizer steps (running_totals: the epoch so far)
    stopping: BaseException | None = None  # set by a callback (a preemption checkpoint written): end the run

    def log(self, text: str) -> None:
        self.hooks.on_message(self, text)


# ----------------------------------------------------------------------------- epochs

def _local(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def _totals(reduce: Callable[[Sequence[float]], list[float]], loss_sum: Any, correct: Any,
            seen: int) -> tuple[float, float, int]:
    """Mean loss, accuracy and sample count over every rank; the one device sync of a pass."""
    total_loss, total_correct, total_seen = reduce([float(loss_sum), float(correct), seen])
    return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1), int(total_seen)


def train_epoch(run: Run, batches: Iterable, stepper: Stepper, first: int = 0) -> dict[str, float]:
    """One pass over the training batches (from batch ``first`` when resumed mid-epoch); floats come out at
    the end (summed over ranks, with the part of the epoch trained before the resume)."""
    start, state = time.perf_counter(), run.state
    before = int(state.partial["seen"]) if first and state.partial else 0
    for step, (x, y) in enumerate(batches, first + 1):
        loss = stepper.step(x, y)
        state.batch, state.global_step = step, state.global_step + 1
        if loss is not None:
            run.hooks.on_train_batch_end(run, step, loss)
        if run.stopping is not None:
            raise run.stopping
    loss, acc, seen = _totals(run.strategy.reduce, *stepper.finish())
    elapsed = time.perf_counter() - start  # _totals waited for the device
    return {"train_loss": loss, "train_acc": acc, "images_per_s": (seen - before) / max(elapsed, 1e-9)}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, reduce: Callable[[Sequence[float]], list[float]] = _local,
             *, precision: str = "32", tta: str = "none", on_batch: Callable[[int], None] = lambda i: None,
             prefix: str = "test") -> dict[str, float]:
    """Loss and accuracy (``prefix``_loss, _acc, _samples) over every sample exactly once (summed over ranks
    by ``reduce``), no autograd graph built, under the same autocast as training; ``tta``: eval.tta
    (step.TTA_VIEWS); ``on_batch`` after each batch (1-based index)."""
    was_training = model.training
    model.eval()
    loss_sum: Any = 0.0
    correct: Any = 0
    seen = 0
    for i, (x, y) in enumerate(batches, 1):
        logits = eval_logits(model, x, precision, tta)
        y = y.to(logits.device, non_blocking=True)
        loss_sum = loss_sum + nn.functional.cross_entropy(logits, y, reduction="sum")
        correct = correct + (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        on_batch(i)
    model.train(was_training)
    loss, acc, total_seen = _totals(reduce, loss_sum, correct, seen)
    return {f"{prefix}_loss": loss, f"{prefix}_acc": acc, f"{prefix}_samples": total_seen}


def _evaluate_epoch(run: Run) -> dict[str, float]:
    """The validation pass (every choice reads it) and, with eval.test_every_epoch, the test pass (a curve
    only), between the evaluation hooks (the weight average swaps itself in there)."""
    cfg = run.cfg
    passes = [("val", run.val)] * (run.val is not None) + [("test", run.test)] * cfg.eval.test_every_epoch
    row: dict[str, float] = {}
    run.hooks.on_evaluate_start(run)
    try:
        for prefix, batches in passes:
            row.update(evaluate(run.strategy.net, batches, run.strategy.reduce, precision=cfg.precision,
                                tta=cfg.eval.tta, prefix=prefix,
                                on_batch=functools.partial(run.hooks.on_evaluate_batch_end, run)))
    finally:
        run.hooks.on_evaluate_end(run)
    return row


def _epoch(run: Run, epoch: int, stepper: Stepper) -> dict[str, float]:
    """Unfreeze what this epoch trains, train, synchronise BatchNorm statistics, evaluate on validation."""
    started, cfg = time.perf_counter(), run.cfg
    run.model.train()
    stages = models.unfrozen_stages(run.layout.stage_names, cfg.model.finetune, epoch, cfg.model.unfreeze_every)
    models.apply_unfrozen(run.model, run.layout, stages)
    if stages != run.trainable:  # DDP registers the trainable parameters when it wraps
        run.trainable = stages
        run.strategy.wrap(run.model)
    first = run.state.batch  # > 0: resumed mid-epoch from a checkpoint
    run.train.set_epoch(epoch, first)
    run.hooks.on_epoch_start(run, epoch + 1, len(run.train))
    stepper.epoch_lr = run.state.partial["lr"] if first and run.state.partial else \
        run.state.optimizer.param_groups[0]["lr"]
    row: dict[str, float] = {"epoch": epoch + 1, "lr": stepper.epoch_lr}
    with memory.explain_cuda_errors():
        row.update(train_epoch(run, run.train, stepper, first))
        run.strategy.sync_buffers(run.model)
        row.update(_evaluate_epoch(run))
    row["seconds"] = time.perf_counter() - started
    return row


# ----------------------------------------------------------------------------- fit

@dataclass(frozen=True)
class UserParts:
    """The caller's own network and datasets (``fit(cfg, model=..., train_data=..., test_data=...)``)."""

    model: nn.Module | None = None
    train_data: Any = None
    test_data: Any = None
    val_data: Any = None


def fit(cfg: Config, *, model: nn.Module | None = None, train_data: Any = None, test_data: Any = None,
        val_data: Any = None, resume: bool | str = False, progress: ProgressMode | Progress = "auto",
        callbacks: Sequence[Callback] = ()) -> FitResult | None:
    """Train ``cfg`` from scratch (or from its last checkpoint with ``resume``) and return the metrics.

    ``resume=True``: continue <out_dir>/<name> (its last.pt must exist); ``resume="auto"`` (or the config's
    ``resume: auto``): continue it when it has a checkpoint, else start it there.

    ``model`` replaces the configured network (trained as given, no surgery); ``train_data``/``test_data``
    (map-style Datasets of (image, label), or DataLoaders over them) replace data.name; ``val_data`` is the
    validation set every choice reads (default: data.val_fraction held out of ``train_data``). Under spawned DDP
    they are pickled into every process: define their classes in an importable module, not in __main__.
    The built-in callbacks (progress, curves.png, checkpoints, loggers) run first, then those named in
    ``cfg.callbacks``, then ``callbacks``. Returns rank 0's result (None on other ranks under torchrun).
    """
    if (train_data is None) != (test_data is None) or (val_data is not None and train_data is None):
        raise ConfigError("fit: give both train_data and test_data (and val_data if you like), or neither")
    everything = [*builtin(cfg, progress), *cb.from_specs(cfg.callbacks), *callbacks]
    parts = UserParts(model, train_data, test_data, val_data)
    if cfg.launcher == "ray" and not DistEnv.from_environ().launched:
        return _fit_on_ray(cfg, resume, parts, everything)
    if cfg.restarts and strategy_class(cfg).group and resume_mode(cfg, resume) == "never" \
            and not DistEnv.from_environ().launched:
        # a restarted group must find this run's folder: pick (and create) it here, before the first start
        cfg = dataclasses.replace(cfg, name=report.new_run_dir(cfg.out_dir, cfg.name).name)
    return launch(cfg, functools.partial(_fit_worker, cfg, resume, parts), everything,
                  again=functools.partial(_fit_worker, cfg, "auto", parts))


def _fit_on_ray(cfg: Config, resume: bool | str, parts: UserParts, callbacks: Sequence[Callback]) -> FitResult:
    """launcher: ray (ray_launch.py). The run folder is picked here, with absolute paths (Ray's workers run
    elsewhere), and every start of the worker group resumes it: a restarted group goes on from its newest
    checkpoint. The result is read back from the run folder's last checkpoint."""
    from trainrig.parallel.ray_train import fit_on_ray

    started = time.perf_counter()
    root = Path(cfg.data.root)
    cfg = dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).resolve()), data=dataclasses.replace(
        cfg.data, root=str(root.resolve()) if root.exists() else cfg.data.root))
    if resume_mode(cfg, resume) == "never":
        cfg = dataclasses.replace(cfg, name=report.new_run_dir(cfg.out_dir, cfg.name).name)
    elif resume is True:
        run_folder(cfg, "strict")  # the checkpoint must exist and the recipe must match: say so before Ray starts
    reported = fit_on_ray(cfg, functools.partial(_fit_worker, cfg, "auto", parts), callbacks)
    run_dir = Path(cfg.out_dir) / cfg.name
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt", mmap=True)
    test = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None
    return _result(config_mod.from_dict(saved["config"]), run_dir, list(saved["history"]), test,
                   time.perf_counter() - started, list(reported.get("checksums", [])))


def _result(cfg: Config, run_dir: Path, history: list[dict], test: dict | None, seconds: float,
            checksums: list[float]) -> FitResult:
    best = choose.best_row(history, cfg.checkpoint.monitor) or {"epoch": 0}
    nan = float("nan")
    return FitResult(cfg, run_dir, history, int(best["epoch"]), float(best.get("val_acc", nan)),
                     test["accuracy"] if test else nan, test["loss"] if test else nan, seconds, checksums, test,
                     choose.stop_epoch(history, cfg.early_stopping))


def _fit_worker(cfg: Config, resume: bool | str, parts: UserParts, env: DistEnv,
                callbacks: Sequence[Callback]) -> FitResult | None:
    held: list[RunLock] = []  # rank 0's lock on the run folder, released however the run ends
    try:
        return _train(cfg, resume, parts, env, callbacks, held)
    finally:
        for lock in held:
            lock.release()


def _train(cfg: Config, resume: bool | str, parts: UserParts, env: DistEnv, callbacks: Sequence[Callback],
           held: list[RunLock]) -> FitResult | None:
    started = time.perf_counter()
    run = _setup(cfg, resume, parts, env, callbacks, held)
    state, strategy = run.state, run.strategy
    run.stepper = stepper = Stepper(strategy, state, nn.CrossEntropyLoss(label_smoothing=run.cfg.optim.label_smoothing),
                                    run.cfg.precision, run.train.batch_size, run.log)
    stepper.restore(state.partial, env.is_main)
    try:
        for epoch in range(state.epoch, run.cfg.epochs):
            if choose.stop_epoch(state.history, run.cfg.early_stopping) is not None:
                break  # checked first: a run resumed at the epoch it stopped stops there again
            row = _epoch(run, epoch, stepper)
            state.epoch, state.batch, state.partial = epoch + 1, 0, None
            state.history.append(row)
            run.hooks.on_epoch_end(run, row)
            if run.stopping is not None:
                raise run.stopping
    except BaseException as exc:
        run.hooks.on_exception(run, exc)
        raise
    stopped = choose.stop_epoch(state.history, run.cfg.early_stopping)
    if stopped is not None:
        es = run.cfg.early_stopping
        run.log(f"early stopping: {es.monitor} did not improve by more than {es.min_delta} for {es.patience} "
                f"epochs; stopped after epoch {stopped} of {run.cfg.epochs}")
    checksums = strategy.checksums(run.model)  # DDP ranks must end with the same weights
    if len(set(checksums)) > 1:
        raise RuntimeError(f"parameters diverged across ranks: checksums {checksums}")
    test = _final_test(run)
    if test is not None:
        run.hooks.on_test_end(run, test)
    run.hooks.on_fit_end(run)
    if not env.is_main:
        return None
    return _result(run.cfg, run.run_dir, list(state.history), test, time.perf_counter() - started, checksums)


def _final_test(run: Run) -> dict | None:
    """The test set, read once: the checkpoint checkpoint.monitor chose (best.pt; last.pt with monitor: last)
    is loaded on every rank and evaluated; rank 0 writes eval.json, confusion.png, mistakes.png, report.html."""
    cfg, strategy = run.cfg, run.strategy
    chosen = choose.best_row(run.state.history, cfg.checkpoint.monitor)
    if not cfg.eval.test or chosen is None:
        return None
    name = "last.pt" if cfg.checkpoint.monitor == "last" else "best.pt"
    strategy.load_weights(run.model, run.run_dir / "checkpoints" / name)
    net = strategy.net if strategy.net is not None else run.model  # None: resumed after its last epoch
    test = evaluation.evaluate_report(
        net, run.test, cfg.data.classes or [], precision=cfg.precision, tta=cfg.eval.tta,
        mistakes=cfg.eval.mistakes, bins=cfg.eval.calibration_bins, world=strategy.env.world_size,
        gather=strategy.gather, on_batch=functools.partial(run.hooks.on_evaluate_batch_end, run))
    test = {"split": "test", "checkpoint": name, "epoch": int(chosen["epoch"]), "monitor": cfg.checkpoint.monitor,
            "seed": cfg.seed, "tta": cfg.eval.tta, **test}
    if strategy.is_main:
        evaluation.write_files(run.run_dir, test, run.splits.test, title=cfg.name)
        run.log(f"test (once, on {name}, epoch {test['epoch']}): accuracy {100 * test['accuracy']:.2f}%, loss "
                f"{test['loss']:.4f}, macro-F1 {test['macro_f1']:.4f}; {run.run_dir / 'report.html'}")
    return test


def _dtype(cfg: Config) -> torch.dtype:
    return torch.float64 if cfg.precision == "64-true" else torch.float32


def _setup(cfg: Config, resume: bool | str, parts: UserParts, env: DistEnv,
           callbacks: Sequence[Callback], held: list[RunLock]) -> Run:
    """Strategy, run folder (rank 0 decides and locks it), data, model, batches, TrainState (restored with
    ``resume``)."""
    strategy = make_strategy(cfg, env)
    torch.set_num_threads(default_threads(cfg, env.local_world_size))
    if strategy.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    mode = resume_mode(cfg, resume)
    cfg, run_dir, resumed, warnings = main_decides(strategy, lambda: claim(cfg, mode, held))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    splits = _load_data(cfg, parts, env)
    cfg = data.resolve(cfg, splits)
    data.check_labels(splits, cfg.model.num_classes)
    model = _build_model(cfg, parts.model)
    if parts.model is not None:  # recorded so that predict/export can rebuild it (if it needs no arguments)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, class_path=f"{type(parts.model).__module__}.{type(parts.model).__qualname__}"))
    run = Run(cfg, run_dir, strategy, strategy.setup(model), Hooks(callbacks, env.is_main), splits,
              layout=models.layout_of(model, cfg.model))
    run.hooks.on_fit_start(run)
    run.log(f"data: {splits.description}")  # the run's first line: which data path was taken
    if cfg.data.batch_size == "auto":
        run.cfg = cfg = auto_batch_size(run, _dtype(cfg))
    run.train, run.val, run.test, _ = data.build(
        cfg.data, device=strategy.device, seed=cfg.seed, rank=env.rank, world=env.world_size,
        channels_last=cfg.model.channels_last, dtype=_dtype(cfg), splits=splits, local_world=env.local_world_size)
    run.state = _state(run, resumed)
    if env.is_main:
        checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarted and mode == "never":
        warnings.append(f"warning: torchrun restart {restarted} without --resume auto: this attempt starts over "
                        f"in a new folder")
    for line in warnings:
        run.log(line)
    run.log(f"run folder: {run_dir}{resumed_how(run.state, resumed, mode)}  strategy: {strategy.describe()}")
    return run


def _state(run: Run, resumed: Path | None) -> TrainState:
    """A fresh TrainState, or the one in ``resumed`` with this config's optimizer hyperparameters (PBT)."""
    state = TrainState.create(run.cfg, run.model, len(run.train), run.strategy.device.type, run.layout)
    if resumed:
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in state.optimizer.param_groups]
        base_lrs = list(state.scheduler.base_lrs)
        run.strategy.load_checkpoint(state, resumed)
        state.adopt_hyperparameters(fresh, base_lrs)  # a PBT trial's mutated values; else a no-op
    return state


def _load_data(cfg: Config, parts: UserParts, env: DistEnv) -> data.Splits:
    source = data.user_source(parts.train_data, parts.test_data, parts.val_data) \
        if parts.train_data is not None else None
    splits = data.load_splits(cfg.data, cfg.seed, channels=cfg.model.in_channels, local_world=env.local_world_size,
                              pretrained=cfg.model.weights == "imagenet" and parts.model is None, source=source)
    missing = config_mod.needs_validation(cfg) if splits.val is None else []
    if missing:
        raise ConfigError(f"{missing[0]} needs a validation split, and {splits.description.split(':')[0]} has none "
                          f"(data.val_fraction is 0)")
    return splits


def _build_model(cfg: Config, given: nn.Module | None = None) -> nn.Module:
    model = given if given is not None else models.build_model(cfg.model, seed=cfg.seed)
    if given is not None or cfg.model.class_path:
        models.check_output(model, cfg.data.image_size, cfg.model.in_channels, cfg.model.num_classes)
    model = model.to(_dtype(cfg))
    if cfg.grad_checkpointing:
        models.enable_grad_checkpointing(model, models.layout_of(model, cfg.model).body)
    return model.to(memory_format=torch.channels_last) if cfg.model.channels_last else model
