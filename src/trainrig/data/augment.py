"""The standard augmentation pack (``data.augment``), from torchvision.transforms.v2, seeded per batch.

Per image, on the device the batch is already on: RandomResizedCrop and an automatic policy (RandAugment,
TrivialAugmentWide, AutoAugment) on the raw pixels, RandomErasing on the normalised ones (each image draws its
own parameters, as in torchvision's reference recipe). Per batch: MixUp or CutMix, which turn the labels into
soft targets (N, num_classes) that the cross-entropy takes as they are (label smoothing still applies).

v2 draws from torch's global generator. Each batch's draws run inside ``torch.random.fork_rng`` seeded from the
batch's own generator (a function of seed, epoch, rank and batch: ``batches.augment_generator``), so a run
resumed mid-epoch augments its remaining batches bitwise as an uninterrupted run does, and nothing else
(dropout, the caller's own draws) sees the global generator move.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from trainrig.config.settings import AugmentSettings

def _v2() -> Any:
    """torchvision.transforms.v2, imported when a transform is made: importing torchvision costs a fresh process
    ~2 s (it loads torch._dynamo), which every CLI command and worker that does not augment would pay."""
    from torchvision.transforms import v2
    return v2


POLICIES: dict[str, Callable[[AugmentSettings], Any]] = {
    "randaugment": lambda s: _v2().RandAugment(num_ops=s.num_ops, magnitude=s.magnitude),
    "trivialaugment": lambda s: _v2().TrivialAugmentWide(),
    "autoaugment": lambda s: _v2().AutoAugment(_v2().AutoAugmentPolicy.IMAGENET),
}


@contextlib.contextmanager
def seeded(gen: torch.Generator, stream: int) -> Iterator[None]:
    """torch's global CPU generator seeded from ``gen``'s seed and ``stream`` for the block, then put back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((gen.initial_seed() * 31 + stream) % 2**63)
        yield


def _each(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``transform`` applied to every image of the batch with its own random parameters."""
    return torch.stack([transform(image) for image in x])


@dataclass(frozen=True)
class Augment:
    """``data.augment`` for one run: what to draw, and for how many classes soft targets are built."""

    settings: AugmentSettings
    num_classes: int

    @property
    def active(self) -> bool:
        s = self.settings
        return bool(s.resized_crop or s.policy != "none" or s.erasing or self.mixes)

    @property
    def mixes(self) -> bool:
        return bool((self.settings.mixup or self.settings.cutmix) and self.settings.mix_prob)

    def pixels(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Resized crop and policy on raw images (N, C, H, W): uint8, or floats in [0, 1]."""
        steps: list[Any] = []
        s = self.settings
        if s.resized_crop:
            steps.append(_v2().RandomResizedCrop(tuple(x.shape[-2:]), scale=tuple(s.resized_crop), antialias=True))
        if s.policy != "none":
            steps.append(POLICIES[s.policy](s))
        if not steps:
            return x
        with seeded(gen, 1):
            return _each(_v2().Compose(steps), x)

    def erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """RandomErasing on normalised images: the rectangle becomes 0, the dataset's mean."""
        if not self.settings.erasing:
            return x
        with seeded(gen, 2):
            return _each(_v2().RandomErasing(p=self.settings.erasing, value=0), x)

    def mix(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """MixUp or CutMix of the whole batch (one picked at random when both are on), with probability
        mix_prob; the labels become soft targets either way, so every batch has one type."""
        s = self.settings
        with seeded(gen, 3):
            mixers = [_v2().MixUp(alpha=s.mixup, num_classes=self.num_classes)] * bool(s.mixup) + \
                     [_v2().CutMix(alpha=s.cutmix, num_classes=self.num_classes)] * bool(s.cutmix)
            if float(torch.rand(())) < s.mix_prob:
                return _v2().RandomChoice(mixers)(x, y)
        return x, torch.nn.functional.one_hot(y, self.num_classes).to(x.dtype if x.is_floating_point() else torch.float32)
