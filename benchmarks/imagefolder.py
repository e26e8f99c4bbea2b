"""Training images/s on a folder of image files: trainrig's imagefolder (decoded once into memory) vs
torchvision's ``ImageFolder`` + ``DataLoader(num_workers=2)``, on the same files.

Two folders, both made of real FashionMNIST images, one folder per class:
- ``png``: the 28x28 grey PNGs themselves (the seed case; decoding is cheap);
- ``photos``: the same clothes as 400x300 colour JPEGs (upscaled, tinted, with grain), trained at 64x64:
  what a folder of one's own photos looks like, where decoding and resizing cost real time.
Both sides train the same ResNet18 (new conv1 for grey, 10-class fc) with AdamW, lr 1e-3, the same
batch and threads. Plain: ``ImageFolder`` with per-item transforms (``Resize + CenterCrop`` for photos,
``Grayscale`` for PNGs, ``ToTensor + Normalize``), ``DataLoader(shuffle, num_workers=2,
persistent_workers)``, a plain loop. trainrig: ``data.load_splits`` (cached path: one decoding pass,
timed on its own) and its training step. Also shown: trainrig's streamed path (its DataLoader workers
decode the files every epoch). Each measurement runs in a fresh process; rounds rotate the order.
Run: ``python benchmarks/imagefolder.py [--folders png photos]``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import torchvision.io as tio
from torch import nn
from torchvision import transforms

from trainrig import config, data, models
from trainrig.training.state import TrainState
from trainrig.training.step import Stepper
from trainrig.parallel import DistEnv, SingleStrategy

from throughput import plain_model  # the source notes' ResNet18 surgery, shared with throughput.py


SIZE = {"png": 28, "photos": 64}  # training image side


def _photo(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A 28x28 grey image as a 300x400 colour photo: upscaled, tinted, with sensor-like grain."""
    big = torch.nn.functional.interpolate(x[None, None].float(), size=(300, 400), mode="bilinear")[0]
    tint = torch.rand(3, 1, 1, generator=gen) * 0.6 + 0.4
    grain = torch.randn(3, 300, 400, generator=gen) * 6
    return (big * tint + 20 + grain).round().clamp(0, 255).to(torch.uint8)


def write_folder(root: Path, n: int, kind: str) -> Path:
    t, _ = data.idx.load("data", download=False)
    gen = torch.Generator().manual_seed(0)
    for split, images, labels in (("train", t["train_images"][:n], t["train_labels"][:n]),
                                  ("val", t["test_images"][:200], t["test_labels"][:200])):
        for i, (x, y) in enumerate(zip(images, labels.tolist())):
            folder = root / split / f"c{y}"
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "png":
                tio.write_png(x.unsqueeze(0), str(folder / f"{i:05d}.png"))
            else:
                tio.write_jpeg(_photo(x, gen), str(folder / f"{i:05d}.jpg"), quality=90)
    return root


def plain(root: Path, kind: str, batch: int, steps: int, warmup: int) -> float:
    if kind == "png":
        first = [transforms.Grayscale(1)]
        model = plain_model()
    else:
        first = [transforms.Resize(SIZE[kind]), transforms.CenterCrop(SIZE[kind])]
        model = torchvision.models.resnet18(num_classes=10)
    c = 1 if kind == "png" else 3
    tf = transforms.Compose([*first, transforms.ToTensor(), transforms.Normalize((0.3,) * c, (0.35,) * c)])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, drop_last=True,
                                         persistent_workers=True)
    model = model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    seen, start = 0, 0.0
    for i, (x, y) in enumerate(itertools.chain.from_iterable(itertools.repeat(loader))):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        if i == warmup + steps:
            break
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        seen += y.shape[0]
    float(loss.detach())
    return seen / (time.perf_counter() - start)


def ours(root: Path, kind: str, batch: int, steps: int, warmup: int, cache: bool) -> tuple[float, float]:
    """(images/s of training, seconds spent decoding the folder into memory)."""
    cfg = config.load(None, ["data.name=imagefolder", f"data.root={root}", f"data.batch_size={batch}",
                             "optim.name=adamw", "optim.lr=1e-3", "device=cpu", f"data.image_size={SIZE[kind]}",
                             *([] if cache else ["data.loader=dataloader", "data.num_workers=2"])])
    started = time.perf_counter()
    splits = data.load_splits(cfg.data, cfg.seed)
    decode_s = time.perf_counter() - started
    cfg = data.resolve(cfg, splits)
    train, _, _ = data.build(cfg.data, device=torch.device("cpu"), splits=splits)
    strategy = SingleStrategy(cfg, DistEnv())
    model = strategy.setup(models.build_model(cfg.model, seed=0)).to(memory_format=torch.channels_last).train()
    strategy.wrap(model)
    lay = models.layout_of(model, cfg.model)
    stepper = Stepper(strategy, TrainState.create(cfg, model, len(train), "cpu", lay), nn.CrossEntropyLoss(),
                      "32", batch, log=print)
    batches = itertools.chain.from_iterable(itertools.repeat(train))
    for x, y in itertools.islice(batches, warmup):
        stepper.step(x, y)
    stepper.finish()
    start = time.perf_counter()
    for x, y in itertools.islice(batches, steps):
        stepper.step(x, y)
    _, _, seen = stepper.finish()
    return seen / (time.perf_counter() - start), decode_s


def measure(kind: str, folder: str, root: Path, args: argparse.Namespace) -> tuple[float, float]:
    """One measurement in a fresh process (a process that has trained before runs faster: warm kernels and
    allocator), so no side profits from running later."""
    cmd = [sys.executable, __file__, "--one", kind, "--folders", folder, "--root", str(root), "--batch",
           str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rate, seconds = json.loads(out)
    return rate, seconds


def one(kind: str, folder: str, root: Path, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if kind == "plain":
        print(json.dumps([plain(root, folder, args.batch, args.steps, 3), 0.0]))
    else:
        print(json.dumps(list(ours(root, folder, args.batch, args.steps, 3, cache=kind == "cached"))))


def compare(folder: str, args: argparse.Namespace) -> None:
    kinds = ["plain", "cached", "streamed"]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    decode = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        root = write_folder(Path(tmp), args.images, folder)
        print(f"[{folder}] {args.images} training files written in {time.perf_counter() - started:.0f} s, "
              f"trained at {SIZE[folder]}x{SIZE[folder]}", flush=True)
        for r in range(args.rounds):
            for kind in kinds[r % 3:] + kinds[:r % 3]:
                rate, seconds = measure(kind, folder, root, args)
                rates[kind].append(rate)
                if kind == "cached":
                    decode.append(seconds)
            print(f"[{folder}] round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) +
                  f" img/s; decoding the folder once took {decode[-1]:.1f} s", flush=True)
    ratios = [c / p for c, p in zip(rates["cached"], rates["plain"])]
    streamed = [s / p for s, p in zip(rates["streamed"], rates["plain"])]
    print(f"[{folder}] cached / plain per round: " + ", ".join(f"{r:.2f}" for r in ratios) +
          f"; median {statistics.median(ratios):.2f} (streamed / plain median {statistics.median(streamed):.2f}); "
          f"one-time decode {statistics.median(decode):.1f} s for {args.images + 200} files", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folders", nargs="+", default=["png", "photos"], choices=sorted(SIZE))
    parser.add_argument("--images", type=int, default=4000, help="training files per folder")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one, args.folders[0], Path(args.root), args)
    print(f"torch {torch.__version__}, cpu, {args.threads} threads, batch {args.batch}, {args.steps} timed steps "
          f"per measurement, each in a fresh process, order rotated per round")
    for folder in args.folders:
        compare(folder, args)


if __name__ == "__main__":
    main()
