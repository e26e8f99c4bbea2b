"""The training loop: ``fit(cfg)`` is the one entry point for the CLI, tuning, tests and notebooks.

``fit`` asks the strategy to launch its processes (parallel/); each runs ``_fit_worker``, which reads top to
bottom: build the run (setup.py: plan, data, model, state), then per epoch train (the optimizer steps, the
weight average and mid-epoch checkpoints after each), evaluate on validation, save the epoch's checkpoint and
hand the row to the callbacks; at the end the chosen checkpoint is tested once. Callbacks are observers only
(progress, curves.png, loggers, Tune reporting, the user's).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from trainrig import config as config_mod
from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.parallel import DistEnv, run_workers, strategy_class
from trainrig.training import callbacks as cb, checkpoint, choose, evaluation, memory
from trainrig.training.averaging import Averaging
from trainrig.training.builtin import builtin
from trainrig.training.checkpointing import Saver
from trainrig.training.plan import Resume, pin, resume_request
from trainrig.training.progress import Progress, ProgressMode
from trainrig.training.run import Callback, Held, Run
from trainrig.training.setup import UserParts, build_run, train_stages
from trainrig.training.step import eval_logits


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


# ----------------------------------------------------------------------------- epochs

def _local(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def _totals(reduce: Callable[[Sequence[float]], list[float]], loss_sum: Any, correct: Any,
            seen: int) -> tuple[float, float, int]:
    """Mean loss, accuracy and sample count over every rank; the one device sync of a pass."""
    total_loss, total_correct, total_seen = reduce([float(loss_sum), float(correct), seen])
    return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1), int(total_seen)


@dataclass
class Core:
    """What the loop calls besides the callbacks: the weight average and the checkpoints."""

    average: Averaging
    saver: Saver


def train_epoch(run: Run, core: Core, first: int = 0) -> dict[str, float]:
    """One pass over the training batches (from batch ``first`` when resumed mid-epoch): after each optimizer
    step the weight average, a mid-epoch checkpoint when due (or asked for by a stop signal), the callbacks.
    Floats come out at the end (summed over ranks, with the part of the epoch trained before the resume)."""
    start, state = time.perf_counter(), run.state
    before = int(state.partial["seen"]) if first and state.partial else 0
    for step, (x, y) in enumerate(run.train, first + 1):
        loss = run.stepper.step(x, y)
        state.batch, state.global_step = step, state.global_step + 1
        if loss is not None:  # None: the step's update is settled with the next one (step.py)
            core.average.after_step(run)
            core.saver.after_step(run, step)
            run.hooks.on_train_batch_end(run, step, loss)
        if run.stopping is not None:
            raise run.stopping
    loss, acc, seen = _totals(run.strategy.reduce, *run.stepper.finish())
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
    only), between the evaluation hooks."""
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


def _epoch(run: Run, core: Core, epoch: int) -> dict[str, float]:
    """Unfreeze what this epoch trains, train, synchronise BatchNorm statistics, evaluate on validation (with
    the weight average's weights once it started)."""
    started, cfg, state = time.perf_counter(), run.cfg, run.state
    run.model.train()
    run.trainable = train_stages(run.model, run.layout, run.strategy, cfg, epoch, run.trainable)
    first = state.batch  # > 0: resumed mid-epoch from a checkpoint
    run.train.set_epoch(epoch, first)
    core.average.epoch_start(run, epoch + 1)
    run.hooks.on_epoch_start(run, epoch + 1, len(run.train))
    run.stepper.epoch_lr = state.partial["lr"] if first and state.partial else state.optimizer.param_groups[0]["lr"]
    row: dict[str, float] = {"epoch": epoch + 1, "lr": run.stepper.epoch_lr}
    with memory.explain_cuda_errors():
        row.update(train_epoch(run, core, first))
        run.strategy.sync_buffers(run.model)
        with core.average.swapped(run):
            row.update(_evaluate_epoch(run))
    row["seconds"] = time.perf_counter() - started
    return row


# ----------------------------------------------------------------------------- fit

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
    The built-in callbacks (the stall watchdog, progress, curves.png, loggers) run first, then those named in
    ``cfg.callbacks``, then ``callbacks``. Returns rank 0's result (None on other ranks under torchrun).
    """
    if (train_data is None) != (test_data is None) or (val_data is not None and train_data is None):
        raise ConfigError("fit: give both train_data and test_data (and val_data if you like), or neither")
    strategy_class(cfg).check(cfg)  # what the parallel mode cannot do, before any process or Ray starts
    everything = [*builtin(cfg, progress), *cb.from_specs(cfg.callbacks), *callbacks]
    parts, request = UserParts(model, train_data, test_data, val_data), resume_request(cfg, resume)
    if cfg.launcher == "ray" and not DistEnv.from_environ().launched:
        return _fit_on_ray(cfg, request, parts, everything)
    if cfg.restarts and strategy_class(cfg).group and not DistEnv.from_environ().launched:
        cfg, request = pin(cfg, request)  # a restarted group must find this run's folder
    return run_workers(cfg, functools.partial(_fit_worker, cfg, request, parts), everything,
                       again=functools.partial(_fit_worker, cfg, "auto", parts))


def _fit_on_ray(cfg: Config, resume: Resume, parts: UserParts, callbacks: Sequence[Callback]) -> FitResult:
    """launcher: ray (ray_train.py). The run folder is pinned here, with absolute paths (Ray's workers run
    elsewhere), and every start of the worker group resumes it: a restarted group goes on from its newest
    checkpoint. The result is read back from the run folder's last checkpoint."""
    from trainrig.parallel.ray_train import fit_on_ray

    started = time.perf_counter()
    root = Path(cfg.data.root)
    cfg = dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).resolve()), data=dataclasses.replace(
        cfg.data, root=str(root.resolve()) if root.exists() else cfg.data.root))
    cfg, _ = pin(cfg, resume)
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


def _fit_worker(cfg: Config, resume: Resume, parts: UserParts, env: DistEnv,
                callbacks: Sequence[Callback]) -> FitResult | None:
    held: list[Held] = []  # rank 0's lock on the run folder, the loaders' workers: released however it ends
    try:
        started = time.perf_counter()
        run = build_run(cfg, resume, parts, env, callbacks, held)
        test, checksums = _train(run)
        if not env.is_main:
            return None
        return _result(run.cfg, run.run_dir, list(run.state.history), test, time.perf_counter() - started,
                       checksums)
    finally:
        for item in reversed(held):
            item.release()


def _train(run: Run) -> tuple[dict | None, list[float]]:
    """The epochs (each: train, evaluate, checkpoint, callbacks), then the final test; the test report and
    every rank's parameter checksum."""
    state, core = run.state, Core(Averaging(run.cfg.model.ema), Saver())
    core.saver.start(run)
    try:
        for epoch in range(state.epoch, run.cfg.epochs):
            if choose.stop_epoch(state.history, run.cfg.early_stopping) is not None:
                break  # checked first: a run resumed at the epoch it stopped stops there again
            row = _epoch(run, core, epoch)
            state.epoch, state.batch, state.partial = epoch + 1, 0, None
            state.history.append(row)
            core.saver.after_epoch(run, row)
            run.hooks.on_epoch_end(run, row)
            if run.stopping is not None:
                raise run.stopping
    except BaseException as exc:
        core.saver.close()
        run.hooks.on_exception(run, exc)
        raise
    core.saver.close()
    _say_if_stopped_early(run)
    checksums = run.strategy.checksums(run.model)  # data-parallel ranks must end with the same weights
    if len(set(checksums)) > 1:
        raise RuntimeError(f"parameters diverged across ranks: checksums {checksums}")
    test = _final_test(run)
    if test is not None:
        run.hooks.on_test_end(run, test)
    run.hooks.on_fit_end(run)
    return test, checksums


def _say_if_stopped_early(run: Run) -> None:
    stopped = choose.stop_epoch(run.state.history, run.cfg.early_stopping)
    if stopped is not None:
        es = run.cfg.early_stopping
        run.log(f"early stopping: {es.monitor} did not improve by more than {es.min_delta} for {es.patience} "
                f"epochs; stopped after epoch {stopped} of {run.cfg.epochs}")


def _final_test(run: Run) -> dict | None:
    """The test set, read once: the checkpoint checkpoint.monitor chose (best.pt; last.pt with monitor: last)
    is loaded on every rank and evaluated; rank 0 writes eval.json, confusion.png, mistakes.png, report.html."""
    cfg, strategy = run.cfg, run.strategy
    chosen = choose.best_row(run.state.history, cfg.checkpoint.monitor)
    if not cfg.eval.test or chosen is None:
        return None
    name = "last.pt" if cfg.checkpoint.monitor == "last" else "best.pt"
    strategy.load_weights(run.model, run.run_dir / "checkpoints" / name)
    test = evaluation.evaluate_report(
        strategy.net, run.test, cfg.data.classes or [], precision=cfg.precision, tta=cfg.eval.tta,
        mistakes=cfg.eval.mistakes, bins=cfg.eval.calibration_bins, world=strategy.env.world_size,
        gather=strategy.gather, on_batch=functools.partial(run.hooks.on_evaluate_batch_end, run))
    test = {"split": "test", "checkpoint": name, "epoch": int(chosen["epoch"]), "monitor": cfg.checkpoint.monitor,
            "seed": cfg.seed, "tta": cfg.eval.tta, **test}
    if strategy.is_main:
        evaluation.write_files(run.run_dir, test, run.splits.test, title=cfg.name)
        run.log(f"test (once, on {name}, epoch {test['epoch']}): accuracy {100 * test['accuracy']:.2f}%, loss "
                f"{test['loss']:.4f}, macro-F1 {test['macro_f1']:.4f}; {run.run_dir / 'report.html'}")
    return test
