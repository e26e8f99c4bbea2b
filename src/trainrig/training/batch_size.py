"""``data.batch_size: auto``: the largest batch a real training step survives on this device."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from trainrig import data, models
from trainrig.config import Config
from trainrig.parallel.base import Strategy
from trainrig.training.memory import find_batch_size
from trainrig.training.optim import build_optimizer
from trainrig.training.step import autocast, full_precision


def auto_batch_size(cfg: Config, model: nn.Module, strategy: Strategy, splits: data.Splits, layout: models.Layout,
                    dtype: torch.dtype, log: Callable[[str], None]) -> Config:
    """batch_size: auto -> the largest per-rank batch a real forward+backward+step survives, less the margin,
    agreed (minimum) over ranks; the global size goes into the returned config."""
    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    train_tf, _ = data.transforms(cfg.data, splits.mean, splits.std, cfg.model.channels_last, dtype)

    def try_step(size: int) -> None:
        optimizer = build_optimizer(models.param_groups(model, layout, cfg.model, cfg.optim.lr, cfg.optim), cfg.optim)
        x, y = data.sample_batch(splits.train, size, train_tf, strategy.device)
        with autocast(strategy.device.type, cfg.precision):
            logits = model(x)
        loss_fn(full_precision(logits), y.to(logits.device)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    world = strategy.env.world_size
    try:
        per_rank = find_batch_size(try_step, limit=max(2, len(splits.train) // world),
                                          margin=cfg.data.auto_batch_margin, log=log)
    finally:
        model.load_state_dict(snapshot)
    per_rank = strategy.min_over_ranks(per_rank)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=per_rank * world))
