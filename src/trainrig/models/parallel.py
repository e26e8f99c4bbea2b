"""Model parallelism: a torchvision ResNet cut into stages, one device per stage, optionally pipelined.

The source notes' ``ModelParallelResNet50`` puts conv1..layer2 on device 0 and layer3..fc on device 1;
``split_at`` generalises the cut to any stages and any number of devices. With ``split_size`` the batch
is cut into micro-batches and the stages run as a pipeline (the PyTorch model-parallel tutorial's
scheme): while stage k works on micro-batch i, stage k-1 already works on micro-batch i+1, which overlaps
on asynchronous devices (CUDA). Parameter names are those of the plain ResNet, so checkpoints and
weights files are interchangeable with single-device runs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

RESNET_ORDER = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


def stage_names(split_at: Sequence[str]) -> list[list[str]]:
    """Cut RESNET_ORDER before each name in ``split_at``: ``["layer3"]`` -> [[conv1..layer2], [layer3..fc]]."""
    unknown = [s for s in split_at if s not in RESNET_ORDER[1:]]
    if unknown:
        raise ValueError(f"split_at: {unknown} are not ResNet stages after conv1 (choose from {RESNET_ORDER[1:]})")
    cuts = sorted(RESNET_ORDER.index(s) for s in split_at)
    if len(set(cuts)) != len(cuts):
        raise ValueError(f"split_at: {list(split_at)} names a stage twice")
    bounds = [0, *cuts, len(RESNET_ORDER)]
    return [list(RESNET_ORDER[a:b]) for a, b in zip(bounds, bounds[1:])]


class StagedResNet(nn.Module):
    """A ResNet whose stages live on different devices; ``forward`` moves activations between them."""

    def __init__(self, resnet: nn.Module, split_at: Sequence[str], devices: Sequence[torch.device | str],
                 split_size: int | None = None):
        super().__init__()
        self.stages = stage_names(split_at)
        if len(devices) != len(self.stages):
            raise ValueError(f"{len(devices)} devices for {len(self.stages)} stages")
        self.devices = [torch.device(d) for d in devices]
        self.split_size = split_size
        for names, device in zip(self.stages, self.devices):
            for name in names:
                self.add_module(name, getattr(resnet, name).to(device))

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.devices[i], non_blocking=True)
        for name in self.stages[i]:
            if name == "fc":
                x = torch.flatten(x, 1)
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split_size or self.split_size >= x.shape[0]:
            for i in range(len(self.stages)):
                x = self._stage(i, x)
            return x
        return self._pipelined(x)

    def _pipelined(self, x: torch.Tensor) -> torch.Tensor:
        chunks = list(x.split(self.split_size))
        n_stages, outputs, waiting = len(self.stages), [], {}
        for tick in range(len(chunks) + n_stages - 1):
            for s in reversed(range(n_stages)):  # later stages first: their input is ready from the last tick
                m = tick - s
                if 0 <= m < len(chunks):
                    y = self._stage(s, chunks[m] if s == 0 else waiting.pop(m))
                    if s == n_stages - 1:
                        outputs.append(y)
                    else:
                        waiting[m] = y
        return torch.cat(outputs)


def model_parallel_resnet50(devices: Sequence[str] = ("cuda:0", "cuda:1"), num_classes: int = 1000,
                            split_size: int | None = None) -> StagedResNet:
    """The source notes' ModelParallelResNet50 (conv1..layer2 | layer3..fc); pipelined with ``split_size``."""
    import torchvision  # here, not at import: see data.augment._v2

    return StagedResNet(torchvision.models.resnet50(num_classes=num_classes), ["layer3"], devices, split_size)
