"""Batches for a training process: whole-batch transforms, seeded orders, sharding over ranks.

In-memory uint8 tensors are cut into batches with one permutation per epoch and normalised / flipped /
cropped as whole batches (no per-item work; ``data.augment``'s per-image draws run on the batch tensor, see
augment.py); any other dataset goes through a DataLoader with the same transforms, order and sharding rules.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from trainrig.errors import DataError
from trainrig.data.augment import Augment
from trainrig.data.images import TensorSet


# ----------------------------------------------------------------------------- batch transforms

@dataclass(frozen=True)
class BatchTransform:
    """Turns a batch of raw images into normalised float tensors on the device, with optional augmentation."""

    mean: tuple[float, ...]  # per channel (one value serves every channel)
    std: tuple[float, ...]
    normalize: bool = True
    flip: bool = False
    crop_padding: int = 0
    channels_last: bool = True
    dtype: torch.dtype = torch.float32
    augment: Augment | None = None  # data.augment (augment.py), when any of it is on

    def __call__(self, images: torch.Tensor, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
        x = images.to(device, non_blocking=True)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if gen is not None and self.augment is not None:
            x = self.augment.pixels(x, gen)
        if gen is not None:
            x = self._augment(x, gen)
        x = x.to(self.dtype)
        if images.dtype == torch.uint8:
            x = x.mul_(1 / 255)
        if self.normalize:
            shape = (1, -1, 1, 1)
            x = x.sub_(torch.tensor(self.mean, dtype=x.dtype).view(shape).to(x.device, non_blocking=True))
            x = x.div_(torch.tensor(self.std, dtype=x.dtype).view(shape).to(x.device, non_blocking=True))
        if gen is not None and self.augment is not None:
            x = self.augment.erase(x, gen)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A training (``gen`` given) or evaluation batch: images as ``__call__`` makes them, labels on the
        device; mixup / cutmix make the training labels soft targets (N, num_classes)."""
        x, y = self(images, device, gen), labels.to(device, non_blocking=True)
        if gen is None or self.augment is None or not self.augment.mixes:
            return x, y
        x, y = self.augment.mix(x, y.long(), gen)
        return (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.flip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        p = self.crop_padding
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chan, rows, cols]
        return x


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """One generator per (seed, epoch) for the batch order, the same on every rank (they shard one
    permutation): it does not depend on earlier epochs, so a resumed run sees the batches an
    uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


def augment_generator(seed: int, epoch: int, rank: int, batch: int = 0) -> torch.Generator:
    """Flips and crops of one batch: each rank's own draws, a pure function of (seed, epoch, rank, batch),
    so that a run resumed mid-epoch augments its remaining batches as an uninterrupted one does."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 65_537 + rank + 1) * 1_000_033 + batch) % 2**63)


def shard_indices(n: int, rank: int, world: int, perm: torch.Tensor | None) -> torch.Tensor:
    """DistributedSampler semantics: pad a (shuffled) order to a multiple of ``world`` by wrapping,
    then rank r takes every world-th index starting at r. Without ``perm`` (evaluation) no padding:
    each sample goes to exactly one rank."""
    order = perm if perm is not None else torch.arange(n)
    if world == 1:
        return order
    if perm is None:
        return order[rank::world]
    total = math.ceil(n / world) * world
    if total > n:
        order = torch.cat([order, order[: total - n]])
    return order[rank::world]


class TensorBatches:
    """Batches cut from in-memory tensors: one permutation per epoch, transforms on whole batches."""

    def __init__(self, dataset: TensorSet, batch_size: int, transform: BatchTransform,
                 device: torch.device, *, train: bool, seed: int = 0, rank: int = 0, world: int = 1):
        images, labels = dataset.images, dataset.labels
        keep_on_device = device.type == "cuda"  # one copy of the whole uint8 set beats a copy per batch
        self.images = images.to(device) if keep_on_device else images
        self.labels = labels.to(device) if keep_on_device else labels
        self.batch_size, self.transform, self.device = batch_size, transform, device
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next pass is epoch ``epoch``, from its batch ``start`` (0-based; > 0 resumes mid-epoch)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> torch.Tensor:
        n = self.labels.shape[0]
        if not self.train:
            return shard_indices(n, self.rank, self.world, None)
        perm = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch))
        return shard_indices(n, self.rank, self.world, perm)

    def order(self) -> torch.Tensor:
        """The dataset indices this rank's pass visits, in order (evaluation: every sample on one rank)."""
        return self._indices()

    @property
    def num_samples(self) -> int:
        return len(self._indices()) if not self.train else math.ceil(self.labels.shape[0] / self.world)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest > 1 or (rest == 1 and not self.train) else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices().to(self.images.device)
        first = self.start if self.train else 0
        for batch, start in enumerate(range(first * self.batch_size, len(idx), self.batch_size), first):
            chunk = idx[start:start + self.batch_size]
            if self.train and len(chunk) == 1:
                break  # BatchNorm cannot train on a single sample
            gen = augment_generator(self.seed, self.epoch, self.rank, batch) if self.train else None
            yield self.transform.batch(self.images[chunk], self.labels[chunk], self.device, gen)

    def release(self) -> None:
        """Nothing to end: no worker processes (LoaderBatches.release)."""


class _EpochOrder(torch.utils.data.Sampler):
    """The in-memory path's order for a DataLoader: this rank's share of the epoch's permutation."""

    def __init__(self, n: int, train: bool, seed: int, rank: int, world: int):
        self.n, self.train, self.seed, self.rank, self.world, self.epoch = n, train, seed, rank, world, 0
        self.skip = 0  # samples of the epoch already trained on (a run resumed mid-epoch)

    def indices(self) -> torch.Tensor:
        perm = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)) if self.train else None
        return shard_indices(self.n, self.rank, self.world, perm)[self.skip:]

    def full_length(self) -> int:
        return math.ceil(self.n / self.world) if self.train else len(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return max(0, self.full_length() - self.skip)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


def _worker_context(num_workers: int) -> Any:
    """Fork workers where the platform has fork: a process that DDP spawned defaults to spawn, and a spawned
    worker re-imports torch (seconds) - torchrun-launched runs fork theirs."""
    import multiprocessing

    return "fork" if num_workers and "fork" in multiprocessing.get_all_start_methods() else None


class LoaderBatches:
    """The generic path: any map-style dataset of (image, label) through one DataLoader (workers kept across
    epochs), in the order and shards of the in-memory path, with the same transforms."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, transform: BatchTransform,
                 device: torch.device, *, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.transform, self.device, self.train = dataset, transform, device, train
        self.seed, self.epoch, self.rank = seed, 0, rank
        self.sampler = _EpochOrder(len(dataset), train, seed, rank, world)  # type: ignore[arg-type]
        self.num_samples, self.batch_size, self.start = len(self.sampler), batch_size, 0
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0, multiprocessing_context=_worker_context(num_workers))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """As TensorBatches.set_epoch: the sampler skips the ``start`` batches already trained on."""
        self.epoch = self.sampler.epoch = epoch
        self.start = start if self.train else 0
        self.sampler.skip = self.start * self.batch_size

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def order(self) -> torch.Tensor:
        """As TensorBatches.order."""
        return self.sampler.indices()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with worker_errors():
            for batch, (images, labels) in enumerate(self.loader, self.start):
                if self.train and labels.shape[0] == 1:
                    break
                gen = augment_generator(self.seed, self.epoch, self.rank, batch) if self.train else None
                yield self.transform.batch(images, labels, self.device, gen)

    def release(self) -> None:
        """End the loader's worker processes now. Left to the garbage collector, a loader in a reference cycle
        can be finalised after its queues: its workers never get the stop signal and each is waited for 5 s,
        then killed (15 s at the end of a run's three loaders, in every spawned rank). Lightning shuts its
        loaders' workers down the same way, through the iterator's ``_shutdown_workers``."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


Batches = TensorBatches | LoaderBatches


def sample_batch(train: TensorSet | torch.utils.data.Dataset, size: int, transform: BatchTransform,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training images (repeated if the set is smaller), prepared like a training batch."""
    idx = torch.arange(size) % len(train)
    if isinstance(train, TensorSet):
        images, labels = train.images[idx], train.labels[idx]
    else:
        items = [train[i] for i in idx[: min(size, len(train))].tolist()]
        images = torch.stack([x for x, _ in items])[torch.arange(size) % len(items)]
        labels = torch.stack([torch.as_tensor(y) for _, y in items])[torch.arange(size) % len(items)]
    return transform(images, device, None), labels.to(device)


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """A DataError raised in a DataLoader worker comes back with the worker's traceback in its text:
    keep its last line, the message, so the CLI still prints one line."""
    try:
        yield
    except DataError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        if len(lines) > 1:
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
        raise


def make_batches(train_set: torch.utils.data.Dataset, eval_sets: Sequence[torch.utils.data.Dataset | None], *,
                 batch_size: int, eval_batch_size: int, train_tf: BatchTransform, test_tf: BatchTransform,
                 device: torch.device, seed: int, rank: int, world: int, num_workers: int, pin_memory: bool,
                 force_loader: bool = False) -> tuple[Batches, list[Batches | None]]:
    """Training batches and evaluation batches for each of ``eval_sets`` (None stays None). In-memory tensors
    are cut directly; anything else (or ``force_loader``) goes through a DataLoader."""
    if batch_size % world:
        raise DataError(f"data.batch_size={batch_size} is the global batch and must divide by the "
                        f"{world} processes")
    common = dict(device=device, seed=seed, rank=rank, world=world)
    in_memory = not force_loader and all(isinstance(ds, TensorSet) for ds in (train_set, *eval_sets) if ds is not None)

    def batches(ds: Any, size: int, tf: BatchTransform, train: bool) -> Batches | None:
        if ds is None:
            return None
        if in_memory:
            return TensorBatches(ds, size, tf, train=train, **common)
        return LoaderBatches(ds, size, tf, train=train, num_workers=num_workers, pin_memory=pin_memory, **common)

    return (batches(train_set, batch_size // world, train_tf, True),  # type: ignore[return-value]
            [batches(ds, eval_batch_size, test_tf, False) for ds in eval_sets])
