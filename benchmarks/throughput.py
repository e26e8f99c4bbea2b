"""Training images/s: trainrig vs the plain PyTorch loop of the source notes, on real FashionMNIST.

Plain loop: torchvision ``FashionMNIST`` + ``ToTensor`` + ``DataLoader(num_workers=2)``, the same ResNet18
surgery, the same optimizer algorithm (AdamW, lr 1e-3) and thread count. trainrig: its in-memory batches,
channels_last and fused optimizer, through the training step (``trainrig.training.step.Stepper``). Run: ``python benchmarks/throughput.py``.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from trainrig import config, data, models
from trainrig.training.state import TrainState
from trainrig.training.step import Stepper
from trainrig.parallel import DistEnv, SingleStrategy


def torchvision_root(tmp: Path) -> Path:
    """torchvision's FashionMNIST wants decompressed files under root/FashionMNIST/raw."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in data.idx.find("data", download=False).values():
        payload = path.read_bytes()
        (raw / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(payload) if path.suffix == ".gz" else payload)
    return tmp


def plain_model() -> nn.Module:
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Linear(512, 10)
    return model


def plain_images_per_s(root: Path, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    ds = torchvision.datasets.FashionMNIST(str(root), train=True, download=False,
                                           transform=torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2)
    model = plain_model().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    seen, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        if i == warmup + steps:
            break
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        seen += y.shape[0]
    float(loss)  # waits for the device
    return seen / (time.perf_counter() - start)


def trainrig_images_per_s(batch: int, steps: int, warmup: int, device: torch.device) -> float:
    cfg = config.load(None, [f"data.batch_size={batch}", "optim.name=adamw", "optim.lr=1e-3", f"device={device}"])
    train, _, _ = data.build(cfg.data, device=device, channels_last=cfg.model.channels_last)
    strategy = SingleStrategy(cfg, DistEnv())
    model = strategy.setup(models.build_model(cfg.model, seed=0)).to(memory_format=torch.channels_last).train()
    strategy.wrap(model)
    state = TrainState.create(cfg, model, len(train), device.type, models.layout_of(model, cfg.model))
    stepper = Stepper(strategy, state, nn.CrossEntropyLoss(), "32",
                      batch, log=print)

    def run(n: int) -> float:  # batch cutting, normalisation and the step are all inside the timed loop
        start = time.perf_counter()
        for x, y in itertools.islice(iter(train), n):
            stepper.step(x, y)
        loss_sum, _, seen = stepper.finish()
        float(loss_sum)  # waits for the device
        return seen / (time.perf_counter() - start)
    run(warmup)
    return run(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--images", type=int, default=3840, help="timed training images per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {args.threads} threads, {args.images} timed images per cell")
    print(f"{'batch':>5} {'plain img/s':>12} {'trainrig img/s':>15} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(Path(tmp))
        for batch in args.batch_sizes:
            steps, warmup = max(1, args.images // batch), 3
            plain = plain_images_per_s(root, batch, steps, warmup, device)
            ours = trainrig_images_per_s(batch, steps, warmup, device)
            print(f"{batch:>5} {plain:>12.1f} {ours:>15.1f} {ours / plain:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
