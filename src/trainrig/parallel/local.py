"""The modes that run in this one process: single device, ``nn.DataParallel``, and model parallelism (a
torchvision ResNet cut into stages, one device per stage, pipelined micro-batches)."""
from __future__ import annotations

import sys

import torch
from torch import nn

from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.models.parallel import StagedResNet
from trainrig.parallel.base import DistEnv, Strategy, device_names, resolve_device


class SingleStrategy(Strategy):
    """One process, one device (``strategy: single``)."""


class DataParallelStrategy(Strategy):
    """``nn.DataParallel`` over the local GPUs (a pass-through on CPU)."""

    name = "dp"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        if cfg.device == "auto" and torch.cuda.is_available():
            self.device = torch.device("cuda", 0)

    def wrap(self, model: nn.Module) -> nn.Module:
        gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        if gpus > 1 and self.net is None:
            print("note: strategy dp gathers outputs on one GPU; ddp avoids that imbalance and is usually faster",
                  file=sys.stderr)
        self.net = nn.DataParallel(model) if gpus else nn.DataParallel(model, device_ids=[])
        return self.net


class ModelParallelStrategy(Strategy):
    """The ResNet cut into stages (``split_at``), one device per stage, pipelined with ``split_size``."""

    name = "model_parallel"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.stage_devices = stage_devices(cfg)
        self.device = self.stage_devices[0]  # batches go to the first stage

    @classmethod
    def check(cls, cfg: Config) -> None:
        if cfg.model.compile:
            raise ConfigError("model.compile: not with strategy model_parallel (its stages pipeline micro-batches "
                              "across devices in Python); use strategy single, dp or ddp, or model.compile: false")

    def describe(self) -> str:
        return f"{self.name} x1  devices: {', '.join(map(str, self.stage_devices))}"

    def setup(self, model: nn.Module) -> nn.Module:
        import torchvision  # here, not at import: see data.augment._v2

        if not isinstance(model, torchvision.models.ResNet):
            raise ConfigError(f"strategy=model_parallel splits torchvision ResNets (model.arch resnet*, resnext*, "
                              f"wide_resnet*); {type(model).__name__} ({self.cfg.model.class_path or self.cfg.model.arch}) "
                              f"is not one: use strategy single, dp or ddp")
        try:
            return StagedResNet(model, self.cfg.split_at, self.stage_devices, self.cfg.split_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def stage_devices(cfg: Config) -> list[torch.device]:
    """One device per model-parallel stage: the given list, N devices, or auto (one per stage)."""
    n_stages = len(cfg.split_at) + 1
    names = device_names(cfg, n_stages)
    if len(names) != n_stages:
        raise ConfigError(f"devices: {len(names)} devices for {n_stages} stages (split_at: {cfg.split_at}); "
                          f"give one device per stage")
    return [resolve_device(n) for n in names]
