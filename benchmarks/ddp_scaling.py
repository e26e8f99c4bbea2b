"""DDP scaling on CPU: trainrig against a plain ``mp.spawn`` + DDP script, in one run, medians of 3.

Four measurements, alternated in each of ``--rounds`` rounds (the machine's speed drifts, so they are
interleaved and the median of each is reported):

- trainrig 1 process x 1 thread (batch B; ``strategy: ddp, devices: 1``, i.e. the single-device step in a
  spawned process, as fresh as the others),
- trainrig 2 DDP processes x 1 thread (gloo, global batch 2B: weak scaling, the usual way to quote it),
- plain 1 process x 1 thread: the textbook loop (ResNet18 with the same 1-channel conv1, channels_last,
  fused AdamW, batches cut from in-memory tensors), no trainrig,
- plain 2 DDP processes: the same loop under ``mp.spawn`` + ``DistributedDataParallel`` with its defaults.

Each measurement trains on the same real FashionMNIST images (``--images`` per process) and times the
steps after the first ``--warmup`` ones (a fresh process spends its first steps creating kernels and
buffers). Efficiency is thr2 / (2 x thr1); the plain pair shows what this machine allows DDP to reach.
Run: ``python benchmarks/ddp_scaling.py [--rounds 3] [--images 2560] [--batch 128]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

import trainrig
from trainrig import data
from trainrig.config import default_config_path
from trainrig.parallel.launch import free_port


class WarmTimer(trainrig.Callback):
    """Training images/s over the steps after the first ``warmup``, written to <run>/timing.json."""

    def __init__(self, warmup: int):
        self.warmup, self.marks = warmup, []

    def on_train_batch_end(self, run, step, loss) -> None:
        if step >= self.warmup:
            loss.item()  # waits for the device
            self.marks.append(time.perf_counter())

    def on_epoch_end(self, run, row) -> None:
        steps, seconds = len(self.marks) - 1, self.marks[-1] - self.marks[0]
        (run.run_dir / "timing.json").write_text(json.dumps({"images_per_s": steps * run.cfg.data.batch_size / seconds}))


def trainrig_images_per_s(tmp: str, name: str, warmup: int, overrides: list[str]) -> float:
    cfg = trainrig.load_config(default_config_path(), [f"out_dir={tmp}", f"name={name}", "epochs=1", "threads=1",
                                                       "data.test_subset=256", "sched.name=none",
                                                       "data.flip=false", *overrides])
    result = trainrig.fit(cfg, progress="off", callbacks=[WarmTimer(warmup)])
    return json.loads((result.run_dir / "timing.json").read_text())["images_per_s"]


def _plain_worker(rank: int, world: int, port: int, images: torch.Tensor, labels: torch.Tensor, batch: int,
                  warmup: int, results: object) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model = model.to(memory_format=torch.channels_last)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x_all = ((images[rank::world].float() / 255 - 0.2860) / 0.3530).unsqueeze(1)
    x_all = x_all.contiguous(memory_format=torch.channels_last)
    y_all = labels[rank::world]
    steps, start = len(y_all) // batch, 0.0
    for i in range(steps):
        if i == warmup:
            start = time.perf_counter()
        x, y = x_all[i * batch:(i + 1) * batch], y_all[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    elapsed = time.perf_counter() - start
    if rank == 0:
        results.put(world * (steps - warmup) * batch / elapsed)
    if world > 1:
        dist.destroy_process_group()


def plain_images_per_s(world: int, images: torch.Tensor, labels: torch.Tensor, batch: int, warmup: int) -> float:
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_plain_worker, args=(world, free_port(), images, labels, batch, warmup, results), nprocs=world,
             join=True)
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=2560, help="training images per process per measurement")
    parser.add_argument("--batch", type=int, default=128, help="batch per process")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    args = parser.parse_args()
    tensors, _ = data.idx.load("data", download=False)
    n1, n2 = args.images, 2 * args.images
    images, labels = tensors["train_images"][:n2], tensors["train_labels"][:n2]
    runs = {
        # ddp with one process: no DDP wrapper, the single-device step, but in a fresh spawned process like
        # the other three (a process that has trained before runs faster: kernels and allocator warm)
        "trainrig 1 x 1": lambda tmp: trainrig_images_per_s(tmp, "one", args.warmup, [
            "strategy=ddp", "devices=1", f"data.batch_size={args.batch}", f"data.subset={n1}"]),
        "trainrig DDP 2 x 1": lambda tmp: trainrig_images_per_s(tmp, "two", args.warmup, [
            "strategy=ddp", "devices=2", "backend=gloo", f"data.batch_size={2 * args.batch}", f"data.subset={n2}"]),
        "plain 1 x 1": lambda tmp: plain_images_per_s(1, images[:n1], labels[:n1], args.batch, args.warmup),
        "plain DDP 2 x 1": lambda tmp: plain_images_per_s(2, images, labels, args.batch, args.warmup),
    }
    measured: dict[str, list[float]] = {name: [] for name in runs}
    print(f"torch {torch.__version__}, batch {args.batch} per process, {args.images} images per process", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, run in runs.items():
                measured[name].append(run(tmp))
                print(f"round {r + 1}: {name:<20} {measured[name][-1]:7.1f} images/s", flush=True)
    med = {name: statistics.median(values) for name, values in measured.items()}
    for name, values in measured.items():
        print(f"{name:<20} median {med[name]:7.1f} images/s  (spread {min(values):.1f}-{max(values):.1f})")
    for who in ("trainrig", "plain"):
        effs = [two / (2 * one) for one, two in zip(measured[f"{who} 1 x 1"], measured[f"{who} DDP 2 x 1"])]
        print(f"{who:<9} scaling efficiency thr2 / (2 x thr1): median {statistics.median(effs):.3f} "
              f"(rounds: {', '.join(f'{e:.3f}' for e in effs)})")
    base = max(med["trainrig 1 x 1"], med["plain 1 x 1"])  # one baseline for both: the faster single process
    print(f"against one baseline ({base:.1f} images/s): trainrig DDP {med['trainrig DDP 2 x 1'] / (2 * base):.3f}, "
          f"plain DDP {med['plain DDP 2 x 1'] / (2 * base):.3f}")
    print(f"trainrig DDP / plain DDP throughput: {med['trainrig DDP 2 x 1'] / med['plain DDP 2 x 1']:.3f}")


if __name__ == "__main__":
    main()
