"""Training images/s on a folder of image files: trainrig's imagefolder (decoded once into memory) vs
torchvision's ``ImageFolder`` + ``DataLoader(num_workers=2)``, on the same PNGs.

The folder: real FashionMNIST images written as grey PNGs, one folder per class. Both sides train the
same ResNet18 surgery (1-channel conv1, 10-class fc) with AdamW, lr 1e-3, the same batch and threads.
Plain: ``ImageFolder`` with ``Grayscale + ToTensor + Normalize`` per item, ``DataLoader(shuffle,
num_workers=2)``, a plain loop. trainrig: ``data.load_splits`` (cached path: one decoding pass, timed on
its own) and its training step. Also shown: trainrig's streamed path (DataLoader workers decoding files).
Rounds alternate the sides. Run: ``python benchmarks/imagefolder.py``.
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
from trainrig.state import TrainState
from trainrig.step import Stepper
from trainrig.strategy import DistEnv, SingleStrategy

from throughput import plain_model  # the source notes' ResNet18 surgery, shared with throughput.py


def write_folder(root: Path, n: int) -> Path:
    t, _ = data.idx.load("data", download=False)
    for i, (x, y) in enumerate(zip(t["train_images"][:n], t["train_labels"][:n].tolist())):
        (root / "train" / f"c{y}").mkdir(parents=True, exist_ok=True)
        tio.write_png(x.unsqueeze(0), str(root / "train" / f"c{y}" / f"{i:05d}.png"))
    for i, (x, y) in enumerate(zip(t["test_images"][:200], t["test_labels"][:200].tolist())):
        (root / "val" / f"c{y}").mkdir(parents=True, exist_ok=True)
        tio.write_png(x.unsqueeze(0), str(root / "val" / f"c{y}" / f"{i:05d}.png"))
    return root


def plain(root: Path, batch: int, steps: int, warmup: int) -> float:
    tf = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor(), transforms.Normalize((0.286,), (0.353,))])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    model = plain_model().train()
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


def ours(root: Path, batch: int, steps: int, warmup: int, cache: bool) -> tuple[float, float]:
    """(images/s of training, seconds spent decoding the folder into memory)."""
    cfg = config.load(None, ["data.name=imagefolder", f"data.root={root}", f"data.batch_size={batch}",
                             "optim.name=adamw", "optim.lr=1e-3", "device=cpu",
                             *([] if cache else ["data.loader=dataloader", "data.num_workers=2"])])
    started = time.perf_counter()
    splits = data.load_splits(cfg.data, cfg.seed, channels=1)
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


def measure(kind: str, root: Path, args: argparse.Namespace) -> tuple[float, float]:
    """One measurement in a fresh process (a process that has trained before runs faster: warm kernels and
    allocator), so no side profits from running later."""
    cmd = [sys.executable, __file__, "--one", kind, "--root", str(root), "--batch", str(args.batch),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rate, seconds = json.loads(out)
    return rate, seconds


def one(kind: str, root: Path, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if kind == "plain":
        print(json.dumps([plain(root, args.batch, args.steps, 3), 0.0]))
    else:
        print(json.dumps(list(ours(root, args.batch, args.steps, 3, cache=kind == "cached"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=6000, help="PNG files in the training folder")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one, Path(args.root), args)
    print(f"torch {torch.__version__}, cpu, {args.threads} threads, batch {args.batch}, {args.steps} timed steps, "
          f"{args.images} PNGs; each measurement in a fresh process, order rotated per round")
    kinds = ["plain", "cached", "streamed"]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    decode = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), args.images)
        for r in range(args.rounds):
            for kind in kinds[r % 3:] + kinds[:r % 3]:
                rate, seconds = measure(kind, root, args)
                rates[kind].append(rate)
                if kind == "cached":
                    decode.append(seconds)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " img/s; "
                  f"decoding the folder once took {decode[-1]:.1f} s", flush=True)
    ratios = [c / p for c, p in zip(rates["cached"], rates["plain"])]
    print("cached / plain per round: " + ", ".join(f"{r:.2f}" for r in ratios) +
          f"; median {statistics.median(ratios):.2f}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"median img/s: plain ImageFolder+DataLoader(2) {med['plain']:.1f}, trainrig cached {med['cached']:.1f}, "
          f"trainrig streamed {med['streamed']:.1f}")
    print(f"ratio cached / plain = {med['cached'] / med['plain']:.2f}; streamed / plain = "
          f"{med['streamed'] / med['plain']:.2f}; one-time decode {statistics.median(decode):.1f} s "
          f"for {args.images + 200} files")


if __name__ == "__main__":
    main()
