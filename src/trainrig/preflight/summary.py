"""``trainer summary`` / ``trainrig.summary``: what a config's network is and what training it will cost.

One forward pass of a single image, on the CPU, under ``torch.utils.flop_counter.FlopCounterMode`` with forward
hooks: each module's output shape, parameters (trainable or frozen at the asked epoch of the unfreeze
schedule), and forward FLOPs per image. The memory estimate for a training step at the config's batch size
and precision adds the weights, their gradients, the optimizer's state and the activations autograd keeps
(approximated by every leaf module's output: an upper bound where ReLUs run in place).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainrig import data, models
from trainrig.config import Config

BYTES = {"32": 4, "64-true": 8, "16-mixed": 2, "bf16-mixed": 2}  # an activation's element under each precision
OPTIMIZER_STATE = {"adam": 2, "adamw": 2, "sgd": 1}  # state tensors per trainable parameter (sgd: momentum)


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output: tuple[int, ...]  # one image's output shape (no batch dimension)
    params: int
    trainable: int
    flops: int  # forward FLOPs per image


@dataclass(frozen=True)
class Summary:
    rows: list[LayerRow]
    params: int
    trainable: int
    flops: int  # forward FLOPs per image (a training step is ~3x: forward, and backward for inputs and weights)
    input: tuple[int, int, int]
    batch_size: int
    precision: str
    epoch: int
    weight_bytes: int  # weights + gradients + optimizer state, float32
    activation_bytes: int  # kept for backward over a batch, in the precision's activation dtype

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


def summary(cfg: Config, *, epoch: int = 0, depth: int = 1, model: nn.Module | None = None) -> Summary:
    """The summary of ``cfg``'s network (or ``model``) as it trains at ``epoch`` (0-based; model.finetune and
    unfreeze_every decide what is frozen), modules down to ``depth`` levels. The weights are not loaded (the
    architecture is what counts); a config that leaves image size or classes to the data reads the data."""
    if cfg.data.image_size is None or cfg.model.num_classes is None:
        cfg = data.resolve(cfg, data.load_splits(cfg.data, cfg.seed, channels=cfg.model.in_channels))
    net = model if model is not None else models.build_model(dataclasses.replace(cfg.model, weights=None), seed=0)
    shape = (cfg.model.in_channels or 3, cfg.data.image_size, cfg.data.image_size)
    outputs, flops, kept = _trace(net, shape)
    prefix = type(net).__name__
    with _at_epoch(net, cfg, epoch):
        rows = [LayerRow(name, type(module).__name__, outputs.get(name, ()), *_count(module),
                         flops.get(f"{prefix}.{name}", 0))
                for name, module in net.named_modules() if name and name.count(".") < depth]
        params, trainable = _count(net)
    batch = cfg.data.batch_size if isinstance(cfg.data.batch_size, int) else 1
    return Summary(rows, params, trainable, flops.get("Global", 0), shape, batch, cfg.precision, epoch,
                   4 * (params + trainable * (1 + OPTIMIZER_STATE.get(cfg.optim.name, 0))),
                   BYTES.get(cfg.precision, 4) * batch * (kept + _numel(shape)))


@contextlib.contextmanager
def _at_epoch(net: nn.Module, cfg: Config, epoch: int) -> Iterator[None]:
    """The network frozen as it trains at ``epoch``, for the block; then its flags and modes as they were."""
    flags = [(p, p.requires_grad) for p in net.parameters()]
    modes = [(m, m.training) for m in net.modules()]
    layout = models.layout_of(net, cfg.model)
    net.train()
    try:
        models.apply_unfrozen(net, layout, models.unfrozen_stages(layout.stage_names, cfg.model.finetune, epoch,
                                                                  cfg.model.unfreeze_every))
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _trace(net: nn.Module, shape: tuple[int, int, int]) -> tuple[dict[str, tuple[int, ...]], dict[str, int], int]:
    """For one image: every module's output shape, FlopCounterMode's FLOPs per module (under its own names),
    and the elements every call of a leaf module outputs (a module called twice counts twice)."""
    outputs: dict[str, tuple[int, ...]] = {}
    kept = [0]

    def record(name: str, leaf: bool) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outputs[name] = tuple(out.shape[1:])
                kept[0] += out[0].numel() if leaf else 0
        return hook

    handles = [m.register_forward_hook(record(name, not list(m.children()))) for name, m in net.named_modules()
               if name]
    first = next(net.parameters())
    was_training = net.training
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.eval()(torch.zeros(1, *shape, dtype=first.dtype, device=first.device))
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return outputs, {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}, kept[0]


def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n if shape else 0
