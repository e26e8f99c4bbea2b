"""Exponential moving average of the weights (``model.ema``), timm's ModelEma / Lightning's WeightAveraging.

The average is a copy of the model's ``state_dict`` (parameters and BatchNorm buffers). It lives in the
TrainState, so checkpoints save it and a resumed run continues it exactly; the loop (averaging.py) starts it,
updates it after optimizer steps and swaps it into the model for evaluation.
A checkpoint of a run with an average holds it as ``model`` (what eval, predict, export and warm starts
read) and the weights under training as ``training_weights``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    """The averaged tensors, keyed like the model's state_dict, and the number of updates so far."""

    def __init__(self, tensors: dict[str, torch.Tensor], updates: int = 0):
        self.tensors, self.updates = tensors, updates

    @classmethod
    def start(cls, model: nn.Module) -> "WeightAverage":
        """An average that begins as a copy of the model's current weights."""
        return cls({k: v.detach().clone() for k, v in model.state_dict().items()})

    @classmethod
    def restore(cls, model: nn.Module, tensors: dict[str, torch.Tensor], updates: int) -> "WeightAverage":
        """A saved average, on the devices and in the dtypes (and memory formats) of the model's tensors."""
        own = cls.start(model)
        with torch.no_grad():
            for k, v in own.tensors.items():
                v.copy_(tensors[k])
        own.updates = int(updates)
        return own

    def decay_now(self, decay: float) -> float:
        """The decay of the next update: small at first (1/10, 2/11, ...), so the start weights fade fast."""
        return min(decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """average <- d * average + (1 - d) * weights for floating tensors; integer counters are copied."""
        d = self.decay_now(decay)
        current = model.state_dict()
        floats = [k for k, v in self.tensors.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([self.tensors[k] for k in floats], [current[k] for k in floats], 1.0 - d)
        for k, v in self.tensors.items():
            if not v.is_floating_point():
                v.copy_(current[k])
        self.updates += 1

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.tensors)
        try:
            yield
        finally:
            model.load_state_dict(own)

    def take_buffers(self, model: nn.Module) -> None:
        """Copy the model's buffers into the average (after rank 0's were broadcast into the model)."""
        names = {name for name, _ in model.named_buffers()}
        current = model.state_dict()
        with torch.no_grad():
            for k in names & self.tensors.keys():
                self.tensors[k].copy_(current[k])
