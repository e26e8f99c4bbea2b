"""A user's own network and dataset, in an importable module (as spawned DDP needs)."""
import torch
from torch import nn


class TinyNet(nn.Module):
    """Two convolutions and a linear head: what a user might bring instead of a torchvision model."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class WrongOutput(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :3]


class Pairs(torch.utils.data.Dataset):
    """(uint8 image (1, H, W), int label) pairs held in tensors, with torchvision-style ``classes``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.targets, self.classes = images, labels.tolist(), classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i].unsqueeze(0), self.targets[i]


class NoNormNet(nn.Module):
    """TinyNet without BatchNorm: its training step does not depend on how the global batch is split over
    ranks (BatchNorm normalises over each rank's share), so runs at different world sizes compute the same."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LinearNet(nn.Module):
    """Softmax regression on the pixels: a convex problem, whose good learning rates a plain loop can map."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28):
        super().__init__()
        self.head = nn.Linear(in_channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))
