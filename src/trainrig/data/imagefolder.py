"""A folder of the user's images, one subfolder per class (torchvision's ImageFolder layout).

``root/train/<class>/*`` with ``root/val/<class>/*`` (or ``test/``), or one ``root/<class>/*`` tree split
by ``data.val_fraction`` (seeded, stratified per class). Files are found recursively; class names are the
folder names, sorted. Every problem a user can fix is a DataError naming the folder or class.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .images import EXTENSIONS, ImageFiles, is_image


def _class_dirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image files>)")
    return dirs


def _scan(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted); an empty class, a class folder linking to the dataset (or
    above it) and a file that two classes reach (links) are errors: each would train on wrong labels."""
    found: dict[str, list[Path]] = {}
    owner: dict[Path, str] = {}
    top = folder.resolve()
    for d in _class_dirs(folder):
        target = d.resolve()
        if target == top or target in top.parents:
            raise DataError(f"{d}: class folder '{d.name}' is a link to {target}, which holds the other classes' "
                            f"images; give each class a folder of its own")
        files = sorted(p for p in d.rglob("*") if p.is_file() and is_image(p))
        if not files:
            raise DataError(f"{d}: class '{d.name}' has no images (looked for {', '.join(sorted(EXTENSIONS))})")
        for f in files:
            other = owner.setdefault(f.resolve(), d.name)
            if other != d.name:
                raise DataError(f"{f}: the same file is also in class '{other}' (through a link); an image "
                                f"belongs to one class")
        found[d.name] = files
    return found


def _files(by_class: dict[str, list[Path]], classes: list[str]) -> ImageFiles:
    paths, labels = [], []
    for name, files in by_class.items():
        paths += files
        labels += [classes.index(name)] * len(files)
    return ImageFiles(paths, labels)


def _split(by_class: dict[str, list[Path]], fraction: float, seed: int) -> tuple[dict, dict]:
    """Per class, a seeded shuffle; round(n * fraction) files go to validation (at least 1 if n >= 2)."""
    gen = torch.Generator().manual_seed(seed)
    train, val = {}, {}
    for name, files in by_class.items():
        order = torch.randperm(len(files), generator=gen).tolist()
        k = round(len(files) * fraction)
        k = min(max(k, 1 if fraction > 0 and len(files) >= 2 else 0), len(files) - 1)
        val_idx = set(order[:k])
        train[name] = [f for i, f in enumerate(files) if i not in val_idx]
        if k:
            val[name] = [f for i, f in enumerate(files) if i in val_idx]
    return train, val


def layout(root: Path) -> tuple[Path, Path | None]:
    """The training folder and the validation folder (None: split the training one)."""
    if not root.is_dir():
        raise DataError(f"data.root={root}: folder not found (data.name=imagefolder)")
    if (root / "train").is_dir():
        val = next((root / v for v in ("val", "valid", "validation", "test") if (root / v).is_dir()), None)
        return root / "train", val
    return root, None


def load(root: str | Path, val_fraction: float, seed: int) -> tuple[ImageFiles, ImageFiles, tuple[str, ...], str]:
    """Training and validation files with labels, the class names, and a description of the layout."""
    root = Path(root)
    train_dir, val_dir = layout(root)
    by_class = _scan(train_dir)
    classes = sorted(by_class)
    if val_dir is not None:
        val_by_class = _scan(val_dir)
        extra = sorted(set(val_by_class) - set(classes))
        if extra:
            raise DataError(f"{val_dir}: class '{extra[0]}' is in {val_dir.name}/ but not in {train_dir}/ "
                            f"(a model cannot learn a class it never sees)")
        how = f"{train_dir.name}/ + {val_dir.name}/"
    else:
        if not 0 < val_fraction < 1:
            raise DataError(f"{root}: no train/ and val/ folders, so data.val_fraction must lie in (0, 1) "
                            f"to split one off, got {val_fraction}")
        by_class, val_by_class = _split(by_class, val_fraction, seed)
        how = f"one folder split {1 - val_fraction:.0%}/{val_fraction:.0%} per class (seed {seed})"
    if len(classes) < 2:
        raise DataError(f"{train_dir}: only one class folder ('{classes[0]}'); a classifier needs at least two")
    return _files(by_class, classes), _files(val_by_class, classes), tuple(classes), how
