"""Held-out splits: a stratified, seeded part of a dataset, the same on every rank, trial, resume and machine.

The indices are a function of (seed, which split, the labels) alone: Python's ``random.Random`` with a
string seed (its sequence is fixed across Python versions and platforms) shuffles each class's indices,
and round(n * fraction) of each class are held out (at least one when the class has two or more images,
never all of them). No torch RNG is involved, so two torch builds hold out the same images.
"""
from __future__ import annotations

import hashlib
import random

import torch
from torch.utils.data import Dataset

from trainrig.errors import DataError
from trainrig.data.images import ImageFiles, Prepared, TensorSet


def labels_of(ds: Dataset) -> torch.Tensor:
    """Every label of ``ds``, without decoding images where the dataset says them (else read item by item)."""
    found = getattr(ds, "labels", None)
    if isinstance(ds, Prepared) and found is None:
        return torch.tensor([int(ds.dataset[i][1]) for i in range(len(ds))], dtype=torch.long)
    return torch.as_tensor(found).long().flatten()


def take(ds: Dataset, indices: list[int]) -> Dataset:
    """The items of ``ds`` at ``indices`` (in that order), as the same kind of dataset."""
    if isinstance(ds, TensorSet):
        index = torch.tensor(indices, dtype=torch.long)
        return TensorSet(ds.images[index], ds.labels[index])
    if isinstance(ds, ImageFiles):
        return ds.subset(indices)
    inner = ds.dataset if isinstance(ds, Prepared) else ds
    return Prepared(torch.utils.data.Subset(inner, indices))


def holdout(labels: torch.Tensor, fraction: float, seed: int, split: str) -> tuple[list[int], list[int]]:
    """(kept, held out) indices, both sorted: per class a seeded shuffle, round(n * fraction) held out."""
    rng = random.Random(f"trainrig:{split}:{seed}")
    values = labels.tolist()
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(values):
        by_class.setdefault(int(y), []).append(i)
    held: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        k = min(max(round(len(members) * fraction), 1 if len(members) >= 2 else 0), len(members) - 1)
        held += rng.sample(members, k)
    held_set = set(held)
    return [i for i in range(len(values)) if i not in held_set], sorted(held)


def split_off(ds: Dataset, fraction: float, seed: int, split: str, where: str) -> tuple[Dataset, Dataset]:
    """``ds`` less its held-out part, and that part (``split``: val or test)."""
    kept, held = holdout(labels_of(ds), fraction, seed, split)
    if not held:
        raise DataError(f"{where}: too few images to hold out a {split} split (data.{split}_fraction={fraction}); "
                        f"every class needs two or more")
    return take(ds, kept), take(ds, held)


def fingerprint(ds: Dataset) -> str:
    """A short hash of a split's labels and images (in memory) or files: equal splits, equal prints."""
    h = hashlib.sha256(labels_of(ds).numpy().tobytes())
    if isinstance(ds, TensorSet):
        h.update(ds.images.contiguous().numpy().tobytes())
    elif isinstance(ds, ImageFiles):
        h.update("\n".join(map(str, ds.paths)).encode())
    return h.hexdigest()[:16]
