"""Datasets, file formats, sources and batching.

FashionMNIST is read straight from its four IDX files into uint8 tensors once per process; batches are
cut from those tensors with one random permutation per epoch, and normalisation and flip/crop augmentation
run on whole batches (no per-item PIL work). A generic ``torch.utils.data.DataLoader`` path stays available.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import DataConfig
from .errors import DataError

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
_IDX_DTYPES = {0x08: torch.uint8}


# ----------------------------------------------------------------------------- IDX files

def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (gzipped or not, told by its first bytes) into a uint8 tensor.

    Checks the magic number, the element type and that the payload holds exactly the declared shape.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} is not supported (expected 0x08, ubyte)")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    payload = memoryview(raw)[4 + 4 * ndim:]
    if len(payload) != math.prod(shape):
        raise DataError(f"{path}: header declares shape {tuple(shape)} ({math.prod(shape)} bytes) "
                        f"but the file holds {len(payload)} bytes")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> dict[str, Path] | None:
    """The four FashionMNIST files in ``folder`` (or its torchvision layout), or None."""
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        found = {key: _find_file(candidate, stem) for key, stem in FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def fashion_mnist_sources(root: str | Path) -> list[Path]:
    """Where FashionMNIST is looked for, in order: data.root, $TRAINRIG_DATA, the Debian package folder."""
    sources = [Path(root)]
    if os.environ.get("TRAINRIG_DATA"):
        sources.append(Path(os.environ["TRAINRIG_DATA"]))
    sources.append(SYSTEM_DIR)
    return sources


def find_fashion_mnist(root: str | Path, download: bool = True) -> dict[str, Path]:
    """Locate the four IDX files; as a last resort download them with torchvision into ``root``."""
    sources = fashion_mnist_sources(root)
    for folder in sources:
        found = _complete(folder)
        if found:
            return found
    failure = ""
    if download:
        try:
            import torchvision

            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
            found = _complete(Path(root))
            if found:
                return found
        except Exception as exc:  # network errors come in many types
            failure = f" torchvision download into {root} failed: {type(exc).__name__}: {exc}."
    looked = ", ".join(str(s) for s in sources)
    raise DataError(
        f"FashionMNIST not found (looked in {looked}).{failure} Get it with "
        f"'apt-get install dataset-fashion-mnist' (Debian) or put the four *-ubyte[.gz] files in data.root "
        f"/ $TRAINRIG_DATA (torchvision downloads them there when online).")


# ----------------------------------------------------------------------------- in-memory splits

@dataclass(frozen=True)
class Splits:
    """Decoded images (N, H, W) uint8 and labels (N,) int64 for train and test."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float
    std: float
    num_classes: int


@functools.lru_cache(maxsize=4)
def _load_fashion_cached(files: tuple[tuple[str, str], ...], stamp: tuple[int, ...]) -> Splits:
    paths = dict(files)
    tensors = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
            raise DataError(f"{paths[split + '_images']}: expected images of shape (N, 28, 28), "
                            f"got {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{paths[split + '_labels']}: {labels.shape[0] if labels.ndim == 1 else '?'} labels "
                            f"for {images.shape[0]} images")
        if labels.numel() and int(labels.max()) >= len(FASHION_CLASSES):
            raise DataError(f"{paths[split + '_labels']}: label {int(labels.max())} outside 0..9")
    return Splits(tensors["train_images"], tensors["train_labels"].long(),
                  tensors["test_images"], tensors["test_labels"].long(),
                  FASHION_MEAN, FASHION_STD, len(FASHION_CLASSES))


def load_fashion_mnist(root: str | Path, download: bool = True) -> Splits:
    """Find, read, verify and cache (per process) the FashionMNIST splits."""
    found = find_fashion_mnist(root, download=download)
    stamp = tuple(p.stat().st_mtime_ns for p in found.values())
    return _load_fashion_cached(tuple((k, str(v)) for k, v in found.items()), stamp)


def synthetic(n_train: int, n_test: int, size: int = 28, num_classes: int = 10, seed: int = 0) -> Splits:
    """Noisy copies of one random template per class: a signal a small network learns in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, size, size, generator=gen)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.rand(n, size, size, generator=gen)
        images = 0.5 * templates[labels] + 0.5 * noise
        return (images * 255).round().to(torch.uint8), labels

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Splits(train_x, train_y, test_x, test_y, 0.5, 0.2, num_classes)


def load_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    if cfg.name == "synthetic":
        splits = synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.image_size, seed=seed)
    else:
        splits = load_fashion_mnist(cfg.root)
    if cfg.subset or cfg.test_subset:
        tr, te = cfg.subset or None, cfg.test_subset or None
        splits = Splits(splits.train_images[:tr], splits.train_labels[:tr], splits.test_images[:te],
                        splits.test_labels[:te], splits.mean, splits.std, splits.num_classes)
    return splits


# ----------------------------------------------------------------------------- batch transforms

@dataclass(frozen=True)
class BatchTransform:
    """Turns a batch of raw images into normalised float tensors on the device, with optional augmentation."""

    mean: float
    std: float
    normalize: bool = True
    flip: bool = False
    crop_padding: int = 0
    channels_last: bool = True
    dtype: torch.dtype = torch.float32

    def __call__(self, images: torch.Tensor, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
        x = images.to(device, non_blocking=True)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if gen is not None:
            x = self._augment(x, gen)
        x = x.to(self.dtype)
        if images.dtype == torch.uint8:
            x = x.mul_(1 / 255)
        if self.normalize:
            x = x.sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

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
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Flips and crops: a stream of each rank's own, still a pure function of (seed, epoch, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 65_537 + rank + 1)


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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform: BatchTransform,
                 device: torch.device, *, train: bool, seed: int = 0, rank: int = 0, world: int = 1):
        keep_on_device = device.type == "cuda"  # one copy of the whole uint8 set beats a copy per batch
        self.images = images.to(device) if keep_on_device else images
        self.labels = labels.to(device) if keep_on_device else labels
        self.batch_size, self.transform, self.device = batch_size, transform, device
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> tuple[torch.Tensor, torch.Generator | None]:
        n = self.labels.shape[0]
        if not self.train:
            return shard_indices(n, self.rank, self.world, None), None
        perm = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch))
        return shard_indices(n, self.rank, self.world, perm), augment_generator(self.seed, self.epoch, self.rank)

    @property
    def num_samples(self) -> int:
        return len(self._indices()[0]) if not self.train else math.ceil(self.labels.shape[0] / self.world)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest > 1 or (rest == 1 and not self.train) else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx, gen = self._indices()
        idx = idx.to(self.images.device)
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start:start + self.batch_size]
            if self.train and len(chunk) == 1:
                break  # BatchNorm cannot train on a single sample
            x = self.transform(self.images[chunk], self.device, gen if self.train else None)
            yield x, self.labels[chunk].to(self.device, non_blocking=True)


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class LoaderBatches:
    """The generic path: any map-style dataset of (image, label) through a DataLoader, same transforms."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, transform: BatchTransform,
                 device: torch.device, *, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.transform, self.device, self.train = dataset, transform, device, train
        self.seed, self.epoch, self.rank = seed, 0, rank
        n = len(dataset)  # type: ignore[arg-type]
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train,
                                                          seed=seed, drop_last=False)
            if not train:  # evaluation counts every sample exactly once
                sampler = list(range(n))[rank::world]  # type: ignore[assignment]
        else:
            sampler = None
        self.sampler = sampler
        self.loader_args = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                                persistent_workers=num_workers > 0)
        self.num_samples = len(sampler) if sampler is not None else n  # type: ignore[arg-type]
        self.batch_size = batch_size
        self._loader: torch.utils.data.DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, torch.utils.data.DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = augment_generator(self.seed, self.epoch, self.rank) if self.train else None
        if self.sampler is None and self.train:
            sampler = torch.utils.data.RandomSampler(self.dataset, generator=epoch_generator(self.seed, self.epoch))
        else:
            sampler = self.sampler
        loader = torch.utils.data.DataLoader(self.dataset, sampler=sampler, **self.loader_args)
        for images, labels in loader:
            if self.train and labels.shape[0] == 1:
                break
            yield self.transform(images, self.device, gen), labels.to(self.device, non_blocking=True)


Batches = TensorBatches | LoaderBatches


def sample_batch(splits: Splits, size: int, device: torch.device, channels_last: bool = True,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training images (repeated if the set is smaller), prepared like a training batch."""
    idx = torch.arange(size) % len(splits.train_labels)
    tf = BatchTransform(mean=splits.mean, std=splits.std, channels_last=channels_last, dtype=dtype)
    return tf(splits.train_images[idx], device, None), splits.train_labels[idx].to(device)


def build(cfg: DataConfig, *, device: torch.device, seed: int = 0, rank: int = 0, world: int = 1,
          channels_last: bool = True, dtype: torch.dtype = torch.float32,
          splits: Splits | None = None) -> tuple[Batches, Batches, Splits]:
    """Train and test batch iterators for this process (``rank`` of ``world``), plus the raw splits."""
    splits = splits if splits is not None else load_splits(cfg, seed)
    if not isinstance(cfg.batch_size, int):
        raise DataError(f"data.batch_size={cfg.batch_size!r} must be resolved to a number before batching")
    if cfg.batch_size % world:
        raise DataError(f"data.batch_size={cfg.batch_size} is the global batch and must divide by the "
                        f"{world} processes")
    per_rank = cfg.batch_size // world
    common = dict(mean=splits.mean, std=splits.std, normalize=cfg.normalize, channels_last=channels_last, dtype=dtype)
    train_tf = BatchTransform(flip=cfg.flip, crop_padding=cfg.crop_padding, **common)
    test_tf = BatchTransform(**common)
    if cfg.loader == "dataloader":
        extra = dict(num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, seed=seed, rank=rank, world=world)
        train = LoaderBatches(_ImageDataset(splits.train_images, splits.train_labels), per_rank, train_tf,
                              device, train=True, **extra)
        test = LoaderBatches(_ImageDataset(splits.test_images, splits.test_labels), cfg.eval_batch_size,
                             test_tf, device, train=False, **extra)
    else:
        train = TensorBatches(splits.train_images, splits.train_labels, per_rank, train_tf, device,
                              train=True, seed=seed, rank=rank, world=world)
        test = TensorBatches(splits.test_images, splits.test_labels, cfg.eval_batch_size, test_tf, device,
                             train=False, seed=seed, rank=rank, world=world)
    return train, test, splits
