"""A folder of the user's images, one subfolder per class (torchvision's ImageFolder layout).

``root/train/<class>/*`` with ``root/val/<class>/*`` and ``root/test/<class>/*``, or one ``root/<class>/*``
tree; a split the layout lacks is held out of the training images (splits.py: seeded, stratified per class). Files are found recursively; class names are the
folder names, sorted. Every problem a user can fix is a DataError naming the folder or class.
"""
from __future__ import annotations

from pathlib import Path

from trainrig.errors import DataError
from trainrig.data.images import EXTENSIONS, ImageFiles, is_image


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


def layout(root: Path) -> tuple[Path, Path | None, Path | None]:
    """The training folder, the validation folder and the test folder (None: held out of the training one)."""
    if not root.is_dir():
        raise DataError(f"data.root={root}: folder not found (data.name=imagefolder)")
    if (root / "train").is_dir():
        val = next((root / v for v in ("val", "valid", "validation") if (root / v).is_dir()), None)
        return root / "train", val, root / "test" if (root / "test").is_dir() else None
    return root, None, None


def _other(folder: Path, train_dir: Path, classes: list[str]) -> ImageFiles:
    by_class = _scan(folder)
    extra = sorted(set(by_class) - set(classes))
    if extra:
        raise DataError(f"{folder}: class '{extra[0]}' is in {folder.name}/ but not in {train_dir}/ "
                        f"(a model cannot learn a class it never sees)")
    return _files(by_class, classes)


def load(root: str | Path) -> tuple[ImageFiles, ImageFiles | None, ImageFiles | None, tuple[str, ...], str]:
    """Training, validation and test files with labels (None: not in the layout, held out of training by
    data.val_fraction / test_fraction), the class names, and a description of the layout."""
    root = Path(root)
    train_dir, val_dir, test_dir = layout(root)
    by_class = _scan(train_dir)
    classes = sorted(by_class)
    if len(classes) < 2:
        raise DataError(f"{train_dir}: only one class folder ('{classes[0]}'); a classifier needs at least two")
    val, test = (_other(d, train_dir, classes) if d is not None else None for d in (val_dir, test_dir))
    how = " + ".join(f"{d.name}/" for d in (train_dir, val_dir, test_dir) if d is not None) \
        if train_dir != root else "one folder of classes"
    return _files(by_class, classes), val, test, tuple(classes), how
