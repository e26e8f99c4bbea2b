"""Optimizer and learning-rate schedule from the config."""
from __future__ import annotations

import math
from typing import Callable

import torch

from trainrig.config import OptimConfig, SchedConfig

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
