"""Building a run in a worker process, once, before it trains: the strategy, the plan (plan.py: run folder and
checkpoint to resume, decided by rank 0 for every rank), data, model, batches, the TrainState and the optimizer
steps - then the ``Run`` the loop trains and the callbacks observe, complete before its first hook."""
from __future__ import annotations

import copy
import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from trainrig import config as config_mod, data, models
from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.machine import cpu_precision_warning
from trainrig.parallel import DistEnv, Strategy, default_threads, make_strategy
from trainrig.training import checkpoint
from trainrig.training.batch_size import auto_batch_size
from trainrig.training.plan import Plan, Resume, claim, main_decides, resumed_how
from trainrig.training.run import Callback, Held, Hooks, Run
from trainrig.training.state import TrainState
from trainrig.training.step import Stepper


@dataclass(frozen=True)
class UserParts:
    """The caller's own network and datasets (``fit(cfg, model=..., train_data=..., test_data=...)``)."""

    model: nn.Module | None = None
    train_data: Any = None
    test_data: Any = None
    val_data: Any = None


def dtype_of(cfg: Config) -> torch.dtype:
    return torch.float64 if cfg.precision == "64-true" else torch.float32


def build_run(cfg: Config, resume: Resume, parts: UserParts, env: DistEnv, callbacks: Sequence[Callback],
              held: list[Held]) -> Run:
    """Plan (rank 0 decides and locks the folder), then build everything the run needs; the lines to show
    wait until the callbacks have seen ``on_fit_start``."""
    strategy = make_strategy(cfg, env)
    torch.set_num_threads(default_threads(cfg, env.local_world_size))
    if strategy.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plan: Plan = main_decides(strategy, lambda: claim(cfg, resume, held))
    cfg, lines = plan.cfg, list(plan.warnings)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    splits = _load_data(cfg, parts, env)
    lines.insert(0, f"data: {splits.description}")  # the run's first line: which data path was taken
    cfg = data.resolve(cfg, splits)
    data.check_labels(splits, cfg.model.num_classes)
    model = _build_model(cfg, parts.model, private=env.world_size > 1)
    if parts.model is not None:  # recorded so that predict/export can rebuild it (if it needs no arguments)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, class_path=f"{type(parts.model).__module__}.{type(parts.model).__qualname__}"))
    layout, model = models.layout_of(model, cfg.model), strategy.setup(model)
    hooks = Hooks(callbacks, env.is_main)
    hooks.setup(model, strategy)
    cfg = _batch_and_compile(cfg, model, strategy, splits, layout, lines)
    steps = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * cfg.optim.accumulate)  # an optimizer
    built = data.build(  # step's batch: accumulate x batch_size, run as that many micro-batches
        steps, device=strategy.device, seed=cfg.seed, rank=env.rank, world=env.world_size,
        channels_last=cfg.model.channels_last, dtype=dtype_of(cfg), splits=splits, local_world=env.local_world_size,
        num_classes=cfg.model.num_classes or 0)
    held.append(built)
    train, val, test = built.train, built.val, built.test
    state = _state(cfg, strategy, model, layout, len(train), plan.resume_from)
    stepper = Stepper(strategy, state, nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), cfg.precision,
                      train.batch_size // cfg.optim.accumulate, lambda text: hooks.on_message(run, text),
                      (cfg.optim.clip_grad_norm, cfg.optim.clip_grad_value))
    stepper.restore(state.partial, env.is_main)
    run = Run(cfg, plan.run_dir, strategy, model, hooks, splits, layout, state, train, val, test, stepper,
              trainable=train_stages(model, layout, strategy, cfg, state.epoch, None))
    _finish(run, env, resume, plan, lines)
    return run


def _batch_and_compile(cfg: Config, model: nn.Module, strategy: Strategy, splits: data.Splits,
                       layout: models.Layout, lines: list[str]) -> Config:
    """batch_size: auto, then model.compile in place (nn.Module.compile: the state_dict keeps its names), after
    the search: each batch size it tried would have compiled anew."""
    if cfg.data.batch_size == "auto":
        cfg = auto_batch_size(cfg, model, strategy, splits, layout, dtype_of(cfg), lines.append)
    if cfg.model.compile:
        model.compile(mode="default" if cfg.model.compile is True else cfg.model.compile)
    return cfg


def train_stages(model: nn.Module, layout: models.Layout, strategy: Strategy, cfg: Config, epoch: int,
                 wrapped: tuple[str, ...] | None) -> tuple[str, ...]:
    """Freeze what epoch ``epoch`` (0-based) does not train (after ``model.train()``: frozen BatchNorm back in
    eval mode) and wrap the model again when that changes what trains (``wrapped``: the stages of the last
    wrap; DDP registers the trainable parameters when it wraps); the stages it trains."""
    stages = models.unfrozen_stages(layout.stage_names, cfg.model.finetune, epoch, cfg.model.unfreeze_every)
    models.apply_unfrozen(model, layout, stages)
    if stages != wrapped:
        strategy.wrap(model)
    return stages


def _finish(run: Run, env: DistEnv, resume: Resume, plan: Plan, lines: list[str]) -> None:
    """config.yaml, the callbacks' on_fit_start, then the lines the build collected."""
    if env.is_main:
        checkpoint.atomic_write_text(run.run_dir / "config.yaml", config_mod.dump(run.cfg))
    slow = cpu_precision_warning(run.cfg.precision, run.strategy.device.type)
    lines += [slow] if slow else []
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarted and resume == "never":
        lines.append(f"warning: torchrun restart {restarted} without --resume auto: this attempt starts over "
                     f"in a new folder")
    run.hooks.on_fit_start(run)
    for line in lines:
        run.log(line)
    run.log(f"run folder: {run.run_dir}{resumed_how(run.state, plan.resume_from, resume)}  "
            f"strategy: {run.strategy.describe()}")


def _state(cfg: Config, strategy: Strategy, model: nn.Module, layout: models.Layout, steps: int,
           resumed: Path | None) -> TrainState:
    """A fresh TrainState, or the one in ``resumed`` with this config's optimizer hyperparameters (PBT)."""
    state = TrainState.create(cfg, model, steps, strategy.device.type, layout)
    if resumed:
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in state.optimizer.param_groups]
        base_lrs = list(state.scheduler.base_lrs)
        strategy.load_checkpoint(state, resumed)
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


def _build_model(cfg: Config, given: nn.Module | None = None, private: bool = False) -> nn.Module:
    # torch.multiprocessing hands a spawned process its arguments' tensors in shared memory: without a copy of
    # its own, every rank's optimizer would step the same parameters (each update applied once per rank)
    if given is not None and private:
        given = copy.deepcopy(given)
    model = given if given is not None else models.build_model(cfg.model, seed=cfg.seed)
    if given is not None or cfg.model.class_path:
        models.check_output(model, cfg.data.image_size, cfg.model.in_channels, cfg.model.num_classes)
    model = model.to(dtype_of(cfg))
    if cfg.grad_checkpointing:
        models.enable_grad_checkpointing(model, models.layout_of(model, cfg.model).body)
    return model.to(memory_format=torch.channels_last) if cfg.model.channels_last else model
