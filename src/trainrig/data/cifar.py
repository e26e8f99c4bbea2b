"""CIFAR-10 and CIFAR-100 in either of their published formats, read without running pickled code.

Python version (what torchvision downloads): ``cifar-10-batches-py/`` or ``cifar-100-python/``, pickled
dicts holding a numpy array; read with an unpickler that only rebuilds numpy arrays. Binary version:
``cifar-10-batches-bin/`` / ``cifar-100-binary/``, fixed-size records (label byte(s) + 3072 pixel bytes).
"""
from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from trainrig.errors import DataError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class Layout:
    python_dir: str
    binary_dir: str
    train: tuple[str, ...]
    test: str
    meta: str  # python: pickled dict with the names; binary: one name per line
    names_key: str
    label_key: str
    binary_meta: str
    label_bytes: int  # binary records: the label is the last of these bytes (CIFAR-100: coarse, fine)
    torchvision_name: str


LAYOUTS = {
    "cifar10": Layout("cifar-10-batches-py", "cifar-10-batches-bin", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      "test_batch", "batches.meta", "label_names", "labels", "batches.meta.txt", 1, "CIFAR10"),
    "cifar100": Layout("cifar-100-python", "cifar-100-binary", ("train",), "test", "meta", "fine_label_names",
                       "fine_labels", "fine_label_names.txt", 2, "CIFAR100"),
}
_NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
          ("numpy._core.multiarray", "scalar")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def _unpickle(path: Path) -> dict:
    try:
        obj = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (expected a dict)")
    return obj


def _python_split(folder: Path, files: tuple[str, ...], lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        if "data" not in batch or lay.label_key not in batch:
            raise DataError(f"{folder / name}: missing 'data' or '{lay.label_key}'")
        x = torch.as_tensor(batch["data"]).to(torch.uint8)
        if x.ndim != 2 or x.shape[1] != PIXELS or x.shape[0] != len(batch[lay.label_key]):
            raise DataError(f"{folder / name}: expected data of shape (N, {PIXELS}) and N labels, got "
                            f"{tuple(x.shape)} and {len(batch[lay.label_key])}")
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(list(batch[lay.label_key]), dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def _binary_split(folder: Path, files: tuple[str, ...], lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    record = lay.label_bytes + PIXELS
    for name in files:
        raw = (folder / name).read_bytes()
        if len(raw) % record:
            raise DataError(f"{folder / name}: {len(raw)} bytes is not a whole number of {record}-byte records")
        rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, record)
        labels.append(rows[:, lay.label_bytes - 1].long())
        images.append(rows[:, lay.label_bytes:].reshape(-1, 3, 32, 32).clone())
    return torch.cat(images), torch.cat(labels)


def _python_names(folder: Path, lay: Layout) -> tuple[str, ...]:
    return tuple(str(n) for n in _unpickle(folder / lay.meta)[lay.names_key])


def _binary_names(folder: Path, lay: Layout) -> tuple[str, ...]:
    return tuple(line.strip() for line in (folder / lay.binary_meta).read_text().splitlines() if line.strip())


def _locate(root: Path, lay: Layout) -> tuple[Path, str] | None:
    for kind, sub, files in (("python", lay.python_dir, [*lay.train, lay.test, lay.meta]),
                             ("binary", lay.binary_dir, [*(f + ".bin" for f in lay.train), lay.test + ".bin",
                                                         lay.binary_meta])):
        for folder in (root / sub, root):
            if all((folder / f).is_file() for f in files):
                return folder, kind
    return None


@functools.lru_cache(maxsize=2)
def _read(folder: str, kind: str, name: str, stamp: int) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    lay, path = LAYOUTS[name], Path(folder)
    if kind == "python":
        train, test, names = (_python_split(path, lay.train, lay), _python_split(path, (lay.test,), lay),
                              _python_names(path, lay))
    else:
        train, test, names = (_binary_split(path, tuple(f + ".bin" for f in lay.train), lay),
                              _binary_split(path, (lay.test + ".bin",), lay), _binary_names(path, lay))
    for split, (_, labels) in (("train", train), ("test", test)):
        if labels.numel() and int(labels.max()) >= len(names):
            raise DataError(f"{path}: {split} label {int(labels.max())} but only {len(names)} class names")
    return {"train_images": train[0], "train_labels": train[1], "test_images": test[0], "test_labels": test[1]}, names


def load(root: str | Path, name: str, download: bool = True) -> tuple[dict[str, torch.Tensor], tuple[str, ...], Path]:
    """The four tensors, the class names and the folder read; torchvision downloads into ``root`` if missing."""
    lay, root = LAYOUTS[name], Path(root)
    found = _locate(root, lay)
    failure = ""
    if found is None and download:
        try:
            import torchvision

            getattr(torchvision.datasets, lay.torchvision_name)(str(root), train=True, download=True)
            found = _locate(root, lay)
        except Exception as exc:  # network errors come in many types
            failure = f" torchvision download into {root} failed: {type(exc).__name__}: {exc}."
    if found is None:
        raise DataError(f"{name} not found in {root} (expected {lay.python_dir}/ or {lay.binary_dir}/ from the "
                        f"CIFAR site).{failure}")
    folder, kind = found
    stamp = max(p.stat().st_mtime_ns for p in folder.iterdir())
    tensors, names = _read(str(folder), kind, name, stamp)
    return tensors, names, folder
