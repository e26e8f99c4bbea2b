"""A small synthetic set with a learnable signal: noisy copies of one random template per class."""
from __future__ import annotations

import torch

CLASSES = tuple(f"class{i}" for i in range(10))


def make(n_train: int, n_test: int, size: int = 28, num_classes: int = 10,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (N, size, size) and labels for train and test; a small network learns it in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, size, size, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.rand(n, size, size, generator=gen)
        images = 0.5 * templates[labels] + 0.5 * noise
        return (images * 255).round().to(torch.uint8), labels

    return (*draw(n_train), *draw(n_test))
