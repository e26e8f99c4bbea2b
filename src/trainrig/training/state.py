"""The training state: everything a resumed run needs, saved and restored through one path."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainrig import models
from trainrig.config import Config
from trainrig.training.ema import WeightAverage
from trainrig.training.optim import build_optimizer, lr_factor_fn


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, in a form ``weights_only`` loading accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class TrainState:
    """Model (unwrapped), optimizer, per-step schedule, loss scaler, epochs done and their metrics, and the
    position in the epoch under way: ``batch`` steps of it done (0 between epochs), their running metrics
    in ``partial`` (summed over ranks: loss_sum, correct, seen, and the epoch's starting lr); ``ema``: the
    moving average of the weights once model.ema started it (saved as ``model``, see ema.py)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    batch: int = 0
    global_step: int = 0
    partial: dict[str, float] | None = None
    ema: WeightAverage | None = None

    @classmethod
    def create(cls, cfg: Config, model: nn.Module, steps_per_epoch: int, device_type: str,
               layout: models.Layout) -> "TrainState":
        optimizer = build_optimizer(models.param_groups(model, layout, cfg.model, cfg.optim.lr, cfg.optim), cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor_fn(cfg.sched, cfg.epochs, max(1, steps_per_epoch)))
        scaler = torch.amp.GradScaler(device_type, enabled=cfg.precision == "16-mixed")
        return cls(model, optimizer, scheduler, scaler)

    def state_dict(self, partial: dict[str, float] | None = None) -> dict[str, Any]:
        """Between epochs, or mid-epoch (``batch`` > 0) with that epoch's running metrics in ``partial``."""
        weights = {"model": self.model.state_dict()} if self.ema is None else {
            "model": self.ema.tensors, "training_weights": self.model.state_dict(), "ema_updates": self.ema.updates}
        return {**weights, "optimizer": self.optimizer.state_dict(), **self.progress_dict(partial)}

    def progress_dict(self, partial: dict[str, float] | None = None) -> dict[str, Any]:
        """Everything but the weights and the optimizer's state: where the run is, its schedule and RNGs (a
        sharded checkpoint writes the rest as shards)."""
        position = {"batch": self.batch, "partial": dict(partial)} if self.batch and partial else {"batch": 0}
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "history": list(self.history), "rng": rng_state(),
                "global_step": self.global_step, **position}

    def adopt_hyperparameters(self, fresh: list[dict], base_lrs: list[float]) -> None:
        """After loading a checkpoint: take the optimizer hyperparameters of the config this run was started
        with (``fresh``: param groups as built from it), the schedule's position kept - how a PBT trial goes on
        from another trial's checkpoint with mutated lr / weight decay / momentum. Unchanged values give the
        same floats, so a plain resume is untouched."""
        self.scheduler.base_lrs = list(base_lrs)
        for group, new, base, factor in zip(self.optimizer.param_groups, fresh, base_lrs, self.scheduler.lr_lambdas):
            group.update({k: v for k, v in new.items() if k not in ("params", "lr")})
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state.get("training_weights", state["model"]))
        if "training_weights" in state:
            self.ema = WeightAverage.restore(self.model, state["model"], state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_progress(state)

    def load_progress(self, state: dict[str, Any]) -> None:
        """The part ``progress_dict`` wrote."""
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.batch, self.partial = int(state.get("batch", 0)), state.get("partial")
        self.global_step = int(state.get("global_step", 0))
