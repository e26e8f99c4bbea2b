"""Datasets: a registry of sources, the decision to decode once into memory or stream, normalisation.

``load_splits`` reads the configured source (``SOURCES``), brings every image to the model's channel
count and ``data.image_size``, keeps the decoded uint8 set in memory when it fits ``data.cache_mb``
(else a DataLoader decodes per item), and computes the training set's per-channel mean and std.
``resolve`` writes what was found (classes, size, channels, statistics) into the run's config, so
checkpoints, ``trainer predict`` and exports prepare images exactly as training did.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch.utils.data import Dataset

from trainrig.config import Config, DataConfig
from trainrig.errors import ConfigError, DataError
from trainrig.machine import usable_cpus
from trainrig.data import cifar, idx, imagefolder, synthetic
from trainrig.data.augment import Augment
from trainrig.data.batches import (BatchTransform, Batches, LoaderBatches, TensorBatches, augment_generator, epoch_generator, make_batches, sample_batch, shard_indices, worker_errors)
from trainrig.data.idx import read_idx
from trainrig.data.images import ImageFiles, Prepared, TensorSet, channel_stats, decode, native_channels, prepare
from trainrig.data.splits import fingerprint, holdout, split_off, take

__all__ = ["BatchTransform", "Batches", "Built", "ImageFiles", "LoaderBatches", "Prepared", "SOURCES", "Source", "Splits",
           "TensorBatches", "TensorSet", "augment_generator", "fingerprint", "holdout", "build", "epoch_generator", "load_splits", "read_idx",
           "resolve", "sample_batch", "shard_indices", "transforms", "user_source"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STATS_SAMPLE = 1000  # images read to estimate mean/std when the set is not in memory


@dataclass(frozen=True)
class Source:
    """What a source reads: training and test datasets (uint8 images), class names, where it came from."""

    train: Dataset
    test: Dataset | None  # None: held out of train (data.test_fraction)
    classes: tuple[str, ...]
    where: str
    user: bool = False  # the caller's own datasets: their transforms may be random, so never cached
    val: Dataset | None = None  # None: held out of train (data.val_fraction)


def _mnist_family(name: str) -> Callable[[DataConfig, int], Source]:
    def read(cfg: DataConfig, seed: int) -> Source:
        t, folder = idx.load(cfg.root, name)
        return Source(TensorSet(t["train_images"], t["train_labels"]), TensorSet(t["test_images"], t["test_labels"]),
                      idx.FAMILY[name].classes, f"{idx.FAMILY[name].title} in {folder}")
    return read


def _cifar(name: str) -> Callable[[DataConfig, int], Source]:
    def read(cfg: DataConfig, seed: int) -> Source:
        t, classes, folder = cifar.load(cfg.root, name)
        return Source(TensorSet(t["train_images"], t["train_labels"]), TensorSet(t["test_images"], t["test_labels"]),
                      classes, f"{name} in {folder}")
    return read


def _imagefolder(cfg: DataConfig, seed: int) -> Source:
    train, val, test, classes, how = imagefolder.load(cfg.root)
    return Source(train, test, classes, f"imagefolder {cfg.root} ({how})", val=val)


def _synthetic(cfg: DataConfig, seed: int) -> Source:
    tx, ty, vx, vy = synthetic.make(cfg.synthetic_train, cfg.synthetic_test, cfg.image_size or 28, seed=seed)
    return Source(TensorSet(tx, ty), TensorSet(vx, vy), synthetic.CLASSES, "synthetic templates + noise")


SOURCES: dict[str, Callable[[DataConfig, int], Source]] = {
    "fashion_mnist": _mnist_family("fashion_mnist"), "mnist": _mnist_family("mnist"),
    "kmnist": _mnist_family("kmnist"), "cifar10": _cifar("cifar10"), "cifar100": _cifar("cifar100"),
    "imagefolder": _imagefolder, "synthetic": _synthetic,
}


def user_source(train_data: Any, test_data: Any, val_data: Any = None) -> Source:
    """The caller's datasets (map-style, items (image, label); a DataLoader contributes its dataset); without
    ``val_data`` the validation split is held out of ``train_data``."""
    train = getattr(train_data, "dataset", train_data)
    test = getattr(test_data, "dataset", test_data)
    val = getattr(val_data, "dataset", val_data)
    for what, ds in (("train_data", train), ("test_data", test), ("val_data", val)):
        if what == "val_data" and ds is None:
            continue
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise DataError(f"{what}: expected a map-style Dataset (with __getitem__ and __len__) or a DataLoader "
                            f"over one, got {type(ds).__name__}")
    classes = getattr(train, "classes", None)
    if classes is None:
        targets = getattr(train, "targets", None)
        classes = [str(i) for i in range(int(torch.as_tensor(targets).max()) + 1)] if targets is not None else []
    return Source(Prepared(train), Prepared(test), tuple(str(c) for c in classes),
                  f"your datasets ({type(train).__name__}, {type(test).__name__})", user=True,
                  val=Prepared(val) if val is not None else None)


@dataclass(frozen=True)
class Splits:
    """Training, validation and test sets as the model sees them (before normalisation), and what describes
    them. ``val`` is None with data.val_fraction 0 (and no validation set of the source's own)."""

    train: Dataset  # TensorSet: decoded in memory; anything else: decoded per item by a DataLoader
    test: Dataset
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    size: int
    description: str
    val: Dataset | None = None

    @property
    def in_memory(self) -> bool:
        return all(isinstance(ds, TensorSet) for ds in (self.train, self.val, self.test) if ds is not None)

    @property
    def train_images(self) -> torch.Tensor:
        return self.train.images  # type: ignore[attr-defined]

    @property
    def train_labels(self) -> torch.Tensor:
        return self.train.labels  # type: ignore[attr-defined]

    @property
    def test_images(self) -> torch.Tensor:
        return self.test.images  # type: ignore[attr-defined]

    @property
    def test_labels(self) -> torch.Tensor:
        return self.test.labels  # type: ignore[attr-defined]

    @property
    def val_images(self) -> torch.Tensor:
        return self.val.images  # type: ignore[union-attr]

    @property
    def val_labels(self) -> torch.Tensor:
        return self.val.labels  # type: ignore[union-attr]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _subset(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` items (data.subset / test_subset)."""
    return ds if not n or n >= len(ds) else take(ds, list(range(n)))  # type: ignore[arg-type]


def _first_image(ds: Dataset) -> torch.Tensor:
    if isinstance(ds, TensorSet):
        return ds.images[0]
    if isinstance(ds, ImageFiles):
        return decode(ds.paths[0])
    if len(ds) == 0:  # type: ignore[arg-type]
        raise DataError("train_data is empty")
    return ds[0][0]


def _with_shape(ds: Dataset, channels: int, size: int) -> Dataset:
    """The same items, decoded (or converted) to ``channels`` x ``size`` x ``size`` on access."""
    if isinstance(ds, ImageFiles):
        return ImageFiles(ds.paths, ds.labels.tolist(), channels, size)
    return Prepared(ds.dataset if isinstance(ds, Prepared) else ds, channels, size)


def _workers(cfg: DataConfig, local_world: int, ds: Dataset | None = None) -> int:
    """data.num_workers, or: none for tensors already in memory, else the cores of this process (<= 4)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if isinstance(ds, TensorSet) or (isinstance(ds, Prepared) and isinstance(ds.dataset, TensorSet)):
        return 0
    return min(4, max(usable_cpus() // max(local_world, 1), 1))


def _cached(ds: Dataset, channels: int, size: int, workers: int) -> TensorSet:
    """Decode (or convert) a whole dataset once into one preallocated uint8 tensor."""
    if isinstance(ds, TensorSet):
        if ds.images.shape[1:] == (channels, size, size):
            return ds
        chunks = [prepare(ds.images[i:i + 4096], channels, size) for i in range(0, len(ds), 4096)]
        return TensorSet(torch.cat(chunks), ds.labels)
    ds = _with_shape(ds, channels, size)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers if len(ds) > 1024 else 0)
    images: torch.Tensor | None = None
    labels = torch.empty(len(ds), dtype=torch.long)  # type: ignore[arg-type]
    start = 0
    with worker_errors():
        for x, y in loader:
            if images is None:
                images = torch.empty((len(ds), *x.shape[1:]), dtype=x.dtype)  # type: ignore[arg-type]
            images[start:start + len(y)] = x
            labels[start:start + len(y)] = y
            start += len(y)
    assert images is not None
    return TensorSet(images, labels)


def _check_files(ds: ImageFiles) -> None:
    """Streamed files are decoded mid-epoch: read every header now so a bad file fails before training."""
    from PIL import Image

    for path in ds.paths:
        try:
            with Image.open(path):
                pass
        except Exception as exc:
            raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def _default_cache_mb(local_world: int) -> float:
    """Half the host RAM available now, shared by the processes on this machine."""
    from trainrig.training.memory import host_memory

    available = host_memory()["available"]
    return 0.5 * (available if available == available else 4096.0) / max(local_world, 1)


def _stats(cfg: DataConfig, train: Dataset, channels: int, pretrained: bool) -> tuple[tuple[float, ...], ...]:
    """data.mean/std if given; ImageNet's for pretrained weights; else the training set's (or a sample's)."""
    if cfg.mean is not None and cfg.std is not None:
        for key, values in (("data.mean", cfg.mean), ("data.std", cfg.std)):
            if len(values) not in (1, channels):
                raise DataError(f"{key}={values}: expected 1 or {channels} values (one per channel)")
        return tuple(cfg.mean), tuple(cfg.std)
    if pretrained:
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (round(sum(IMAGENET_MEAN) / 3, 6),), (round(sum(IMAGENET_STD) / 3, 6),)
    if isinstance(train, TensorSet):
        return channel_stats(train.images)
    n = len(train)  # type: ignore[arg-type]
    picks = torch.linspace(0, n - 1, min(n, STATS_SAMPLE)).long().unique().tolist()
    with worker_errors():
        return channel_stats(torch.stack([train[i][0] for i in picks]))


MIN_SIZE = 8  # data.image_size's lower bound


def load_splits(cfg: DataConfig, seed: int = 0, *, channels: int | None = None, pretrained: bool = False,
                local_world: int = 1, source: Source | None = None) -> Splits:
    """Read the source, shape every image to ``channels`` x ``data.image_size``, cache or stream, get stats."""
    src = source or SOURCES[cfg.name](cfg, seed)
    train, val, test = _three(src, cfg, seed)
    first = _first_image(train)
    channels = channels or (native_channels(first) if first.dtype == torch.uint8 else int(first.shape[-3]))
    size = cfg.image_size or int(min(first.shape[-2:]))
    if size < MIN_SIZE:  # the config allows no less; a run at this size could not predict from its checkpoint
        which = train.paths[0] if isinstance(train, ImageFiles) else f"{src.where}'s first image"
        raise DataError(f"data.image_size: null takes the first training image's size, and {which} is "
                        f"{'x'.join(map(str, first.shape[-2:]))}; set data.image_size (>= {MIN_SIZE}) to resize "
                        f"every image")
    sets = [ds for ds in (train, val, test) if ds is not None]
    need_mb = sum(len(ds) for ds in sets) * channels * size * size / 2**20  # type: ignore[arg-type]
    budget = cfg.cache_mb if cfg.cache_mb is not None else _default_cache_mb(local_world)
    if cfg.loader == "memory" or (cfg.loader == "auto" and not src.user and need_mb <= budget):
        decoders = _workers(cfg, local_world)  # DataLoader workers for the one decoding pass
        train, val, test = (_cached(ds, channels, size, decoders) if ds is not None else None
                            for ds in (train, val, test))
        how = f"decoded once into memory ({need_mb:.0f} MiB, data.cache_mb {budget:.0f})"
    else:
        train, val, test = (_with_shape(ds, channels, size) if ds is not None else None for ds in (train, val, test))
        for ds in (train, val, test):
            if isinstance(ds, ImageFiles):
                _check_files(ds)
        why = ("your datasets are not cached: their transforms may be random" if src.user else
               "data.loader=dataloader" if cfg.loader == "dataloader" else
               f"{need_mb:.0f} MiB > data.cache_mb {budget:.0f}")
        how = f"decoded per batch by a DataLoader, {_workers(cfg, local_world, train)} workers ({why})"
    classes = src.classes
    if cfg.classes is not None:
        if classes and len(cfg.classes) != len(classes):
            raise DataError(f"data.classes names {len(cfg.classes)} classes but {src.where} has {len(classes)}")
        classes = tuple(cfg.classes)
    mean, std = _stats(cfg, train, channels, pretrained)
    counts = f"{len(train)} train / {len(val) if val is not None else 'no'} val / {len(test)} test"
    description = f"{src.where}: {counts} images, {channels}x{size}x{size}, {len(classes)} classes; {how}"
    return Splits(train, test, classes, mean, std, channels, size, description, val)


def _three(src: Source, cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset | None, Dataset]:
    """Training, validation and test sets: the source's own, or held out of training (splits.py); the
    subsets of data.subset / test_subset first."""
    train = _subset(src.train, cfg.subset)
    if not len(train):  # type: ignore[arg-type]
        raise DataError(f"{src.where}: no training images")
    test = src.test
    if test is None:
        train, test = split_off(train, cfg.test_fraction, seed, "test", src.where)
    val = src.val
    if val is None and cfg.val_fraction:
        train, val = split_off(train, cfg.val_fraction, seed, "val", src.where)
    test = _subset(test, cfg.test_subset)
    for name, ds in (("validation", val), ("test", test)):
        if ds is not None and not len(ds):  # type: ignore[arg-type]
            raise DataError(f"{src.where}: the {name} set is empty")
    return train, val, test


def check_labels(splits: Splits, num_classes: int) -> None:
    """Checks on the host before the first step: on a GPU these fail later as a device-side assert."""
    found = [t for t in (getattr(ds, "labels", None) for ds in (splits.train, splits.val, splits.test))
             if t is not None and t.numel()]
    labels = torch.cat([t.flatten().long() for t in found]) if found else torch.zeros(0)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(f"labels go up to {int(labels.max())} but model.num_classes={num_classes}: "
                          f"labels must lie in [0, model.num_classes)")


def resolve(cfg: Config, splits: Splits) -> Config:
    """The run's config with what the data decided filled in (the file a checkpoint and predict rely on)."""
    num_classes = cfg.model.num_classes or splits.num_classes
    if not num_classes:
        raise DataError("the training data has no 'classes' or 'targets' attribute: set model.num_classes")
    classes = list(splits.classes) or [str(i) for i in range(num_classes)]
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, classes=classes, mean=list(splits.mean), std=list(splits.std),
                                      image_size=splits.size),
        model=dataclasses.replace(cfg.model, in_channels=splits.channels, num_classes=num_classes))


def transforms(cfg: DataConfig, mean: Any, std: Any, channels_last: bool = True,
               dtype: torch.dtype = torch.float32, num_classes: int = 0) -> tuple[BatchTransform, BatchTransform]:
    """Training (augmenting) and evaluation batch transforms; ``num_classes``: the model's outputs (the width
    of mixup / cutmix's soft targets)."""
    common = dict(mean=tuple(mean), std=tuple(std), normalize=cfg.normalize, channels_last=channels_last, dtype=dtype)
    augment = Augment(cfg.augment, num_classes or len(cfg.classes or ()))
    return (BatchTransform(flip=cfg.flip, crop_padding=cfg.crop_padding, augment=augment if augment.active else None,
                           **common), BatchTransform(**common))


class Built(NamedTuple):
    """This process's batches of each split (``val`` None without a validation split), and the splits."""

    train: Batches
    val: Batches | None
    test: Batches
    splits: Splits

    def release(self) -> None:
        """End the loaders' worker processes (LoaderBatches.release): a run's ``held``, or a caller's finally."""
        for batches in (self.train, self.val, self.test):
            if batches is not None:
                batches.release()


def build(cfg: DataConfig, *, device: torch.device, seed: int = 0, rank: int = 0, world: int = 1,
          channels_last: bool = True, dtype: torch.dtype = torch.float32, splits: Splits | None = None,
          local_world: int = 1, num_classes: int = 0) -> Built:
    """Train, validation and test batch iterators for this process (``rank`` of ``world``), plus the splits."""
    splits = splits if splits is not None else load_splits(cfg, seed, local_world=local_world)
    if not isinstance(cfg.batch_size, int):
        raise DataError(f"data.batch_size={cfg.batch_size!r} must be resolved to a number before batching")
    train_tf, test_tf = transforms(cfg, splits.mean, splits.std, channels_last, dtype,
                                   num_classes or splits.num_classes)
    train, (val, test) = make_batches(
        splits.train, (splits.val, splits.test), batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        train_tf=train_tf, test_tf=test_tf, device=device, seed=seed, rank=rank, world=world,
        num_workers=_workers(cfg, local_world, splits.train), pin_memory=cfg.pin_memory)
    return Built(train, val, test, splits)  # type: ignore[arg-type]
