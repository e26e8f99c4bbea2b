"""Image files and uint8 image tensors: decode, channel count, size, per-channel statistics.

One path for training, evaluation and ``trainer predict``: a file is decoded to uint8, converted to the
model's channel count and resized (shorter side, then a centre square crop) by the functions below, so
an image gets the same pixels whichever of them sees it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from trainrig.errors import DataError

# torchvision.io decodes these itself; the rest go through Pillow (a torchvision dependency)
NATIVE = {".png", ".jpg", ".jpeg", ".gif", ".webp"}
VIA_PIL = {".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff"}
EXTENSIONS = NATIVE | VIA_PIL
_GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as PIL's convert("L")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """16-bit (or wider) samples to 8 bits: the high byte, as viewers show them."""
    if x.dtype == torch.uint8:
        return x
    x = x.to(torch.int64)
    return (x >> 8 if int(x.max()) > 255 else x).clamp(0, 255).to(torch.uint8)


def _decode_pil(path: Path) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    with Image.open(path) as img:
        img.load()
        if img.mode == "1" or (img.mode == "P" and "transparency" not in img.info and _grey_palette(img)):
            img = img.convert("L")
        elif img.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "F"):
            img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
        arr = np.asarray(img)
    t = torch.from_numpy(arr.astype(np.int64) if arr.dtype != np.uint8 else arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return _to_uint8(t)


def _grey_palette(img: Any) -> bool:
    rgb = img.convert("RGB")
    r, g, b = rgb.split()
    return r.tobytes() == g.tobytes() == b.tobytes()


def _decode_torchvision(path: Path) -> torch.Tensor:
    """torchvision.io's decoders (libjpeg-turbo, libpng): faster than Pillow's. torchvision 0.29 deprecates
    them in favour of TorchCodec; Pillow takes over once they are gone."""
    import torchvision.io as tio

    if not hasattr(tio, "decode_image"):
        return _decode_pil(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = tio.read_file(str(path))
        x = tio.decode_image(raw, mode=tio.ImageReadMode.UNCHANGED)
        if x.shape[0] == 4 and raw[:2].tolist() == [0xFF, 0xD8]:  # a CMYK JPEG, not RGBA: let libjpeg convert
            x = tio.decode_image(raw, mode=tio.ImageReadMode.RGB)
    return _to_uint8(x)


def decode(path: str | Path) -> torch.Tensor:
    """The file's pixels as uint8 (C, H, W), C its own channel count; a bad file is a DataError naming it.
    An animated GIF/WebP gives its first frame, as Pillow (and so torchvision's ImageFolder and timm) does."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: not a readable image (an empty file)")
    try:
        x = _decode_torchvision(path) if path.suffix.lower() in NATIVE else _decode_pil(path)
        return x[0] if x.ndim == 4 else x
    except Exception as exc:  # decoders raise RuntimeError, OSError, ValueError ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable image ({reason})") from None


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (..., C, H, W) to ``channels`` channels: alpha dropped, RGB->grey by luma, grey repeated."""
    c = x.shape[-3]
    if c in (2, 4):  # grey+alpha, RGBA
        x, c = x[..., : c - 1, :, :], c - 1
    if c == channels:
        return x
    if channels == 1 and c == 3:
        w = _GREY.to(x.device).view(3, 1, 1)
        return (x.float() * w).sum(-3, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    if c == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:]).contiguous()
    raise DataError(f"cannot turn {c}-channel images into {channels} channels (model.in_channels)")


def native_channels(x: torch.Tensor) -> int:
    """1 for grey (with or without alpha), 3 for colour."""
    return 1 if x.shape[-3] in (1, 2) else 3


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (..., C, H, W): shorter side to ``size`` (antialiased), then the centre ``size`` x ``size``."""
    h, w = x.shape[-2:]
    if size is None or (h == size and w == size):
        return x
    from torchvision.transforms.v2 import functional as F

    if min(h, w) != size:
        x = F.resize(x, [size], antialias=True)
    return F.center_crop(x, [size, size])


def prepare(x: torch.Tensor, channels: int, size: int | None) -> torch.Tensor:
    return resize(to_channels(x, channels), size)


def load(path: str | Path, channels: int, size: int | None) -> torch.Tensor:
    """A file as the model sees it before normalisation: uint8 (channels, size, size)."""
    return prepare(decode(path), channels, size)


class ImageFiles(Dataset):
    """Image files decoded on access (the DataLoader path); ``channels``/``size`` are set by the caller."""

    def __init__(self, paths: list[Path], labels: list[int], channels: int = 3, size: int | None = None):
        self.paths, self.labels = list(paths), torch.as_tensor(labels, dtype=torch.long)
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return load(self.paths[i], self.channels, self.size), self.labels[i]

    def subset(self, indices: list[int]) -> "ImageFiles":
        return ImageFiles([self.paths[i] for i in indices], self.labels[indices].tolist(), self.channels, self.size)


class TensorSet(Dataset):
    """Decoded uint8 images (N, C, H, W) and labels (N,) in memory: the fast path."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(1)
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class Prepared(Dataset):
    """Any map-style dataset of (image, label) seen as (uint8-or-float tensor (C, H, W), int64 label):
    PIL images become uint8 tensors; ``channels``/``size`` apply to uint8 images."""

    def __init__(self, dataset: Any, channels: int | None = None, size: int | None = None):
        self.dataset, self.channels, self.size = dataset, channels, size

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor | None:
        """All labels without reading images, when the dataset exposes them (``labels`` or ``targets``)."""
        found = getattr(self.dataset, "labels", None)
        found = found if found is not None else getattr(self.dataset, "targets", None)
        return torch.as_tensor(found) if found is not None else None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[i][:2]
        if not isinstance(image, torch.Tensor):
            from torchvision.transforms.v2.functional import pil_to_tensor

            image = pil_to_tensor(image)
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.dtype == torch.uint8 and self.channels:
            image = prepare(image, self.channels, self.size)
        return image, torch.as_tensor(label, dtype=torch.long)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N, C, H, W) images (uint8 scaled to [0, 1]), summed in float64 chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64)
        if images.dtype == torch.uint8:
            x = x / 255
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(max(float(v), 1e-6), 6) for v in std)
