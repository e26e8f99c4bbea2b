"""The MNIST family (FashionMNIST, MNIST, KMNIST): four IDX files each, read into uint8 tensors.

Looked for in data.root (flat, or torchvision's ``<Name>/raw`` layout), then $TRAINRIG_DATA, then (for
FashionMNIST) the Debian package's folder; torchvision's download into data.root is the last resort.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from trainrig.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
_IDX_DTYPES = {0x08: torch.uint8}


@dataclass(frozen=True)
class Family:
    """One member of the family: torchvision's class name (its folder too), classes, how to get the files."""

    title: str
    torchvision_name: str
    classes: tuple[str, ...]
    hint: str = ""


FAMILY = {
    "fashion_mnist": Family("FashionMNIST", "FashionMNIST",
                            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot"), "'apt-get install dataset-fashion-mnist' (Debian) or "),
    "mnist": Family("MNIST", "MNIST", tuple(str(d) for d in range(10))),
    "kmnist": Family("KMNIST", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}


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


def complete(folder: Path, name: str = "fashion_mnist") -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (or its torchvision layout), or None."""
    for candidate in (folder, folder / FAMILY[name].torchvision_name / "raw"):
        found = {key: _find_file(candidate, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def sources(root: str | Path, name: str = "fashion_mnist") -> list[Path]:
    """Where the files are looked for, in order: data.root, $TRAINRIG_DATA, the Debian package folder."""
    found = [Path(root)]
    if os.environ.get("TRAINRIG_DATA"):
        found.append(Path(os.environ["TRAINRIG_DATA"]))
    if name == "fashion_mnist":  # only FashionMNIST has a Debian package; SYSTEM_DIR is read at call time
        found.append(SYSTEM_DIR)
    return found


def find(root: str | Path, name: str = "fashion_mnist", download: bool = True) -> dict[str, Path]:
    """Locate the four IDX files; as a last resort download them with torchvision into ``root``."""
    family = FAMILY[name]
    places = sources(root, name)
    for folder in places:
        found = complete(folder, name)
        if found:
            return found
    failure = ""
    if download:
        try:
            import torchvision

            for train in (True, False):
                getattr(torchvision.datasets, family.torchvision_name)(str(root), train=train, download=True)
            found = complete(Path(root), name)
            if found:
                return found
        except Exception as exc:  # network errors come in many types
            failure = f" torchvision download into {root} failed: {type(exc).__name__}: {exc}."
    looked = ", ".join(str(s) for s in places)
    raise DataError(
        f"{family.title} not found (looked in {looked}).{failure} Get it with {family.hint}"
        f"putting the four *-ubyte[.gz] files in data.root / $TRAINRIG_DATA (torchvision downloads them there "
        f"when online).")


@functools.lru_cache(maxsize=4)
def _read_cached(files: tuple[tuple[str, str], ...], stamp: tuple[int, ...], n_classes: int) -> dict[str, torch.Tensor]:
    paths = dict(files)
    tensors = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.ndim != 3:
            raise DataError(f"{paths[split + '_images']}: expected images of shape (N, H, W), got {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{paths[split + '_labels']}: {labels.shape[0] if labels.ndim == 1 else '?'} labels "
                            f"for {images.shape[0]} images")
        if labels.numel() and int(labels.max()) >= n_classes:
            raise DataError(f"{paths[split + '_labels']}: label {int(labels.max())} outside 0..{n_classes - 1}")
        tensors[f"{split}_labels"] = labels.long()
    return tensors


def load(root: str | Path, name: str = "fashion_mnist", download: bool = True) -> tuple[dict[str, torch.Tensor], Path]:
    """Find, read, verify and cache (per process) the four tensors; also the folder they came from."""
    found = find(root, name, download=download)
    stamp = tuple(p.stat().st_mtime_ns for p in found.values())
    tensors = _read_cached(tuple((k, str(v)) for k, v in found.items()), stamp, len(FAMILY[name].classes))
    return tensors, found["train_images"].parent
