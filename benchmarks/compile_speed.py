"""model.compile on this machine: training images/s with and without torch.compile, and what compiling costs.

Real ``trainrig.fit`` runs on real FashionMNIST (the first ``--images`` training images, one epoch), ResNet18 as
the best recipe builds it (``configs/fashion_resnet18_best.yaml``: no stem max-pool, batch 64), at fp32 and
bf16-mixed. Per run: the first training step (compiling, when on), the median step after ``--warmup`` steps as
images/s, and the first validation pass (which compiles the evaluation graph). The machine's speed drifts by
up to 2x within minutes (a shared host), so every setting runs ``--repeats`` times, the order of the modes
reversed each round, and the table gives the median images/s and its range (the first step and validation
pass: the first round's, when the compile cache was cold).

  python benchmarks/compile_speed.py                        # false and default, at 32 and bf16-mixed
  python benchmarks/compile_speed.py --modes false max-autotune --precisions 32
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import trainrig

ROOT = Path(__file__).resolve().parent.parent


class StepClock(trainrig.Callback):
    """Times of every training step's end, the epoch's start and the first validation pass."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start = self.eval_start = 0.0
        self.eval_seconds: float | None = None

    def on_epoch_start(self, run, epoch, steps):
        self.start = time.perf_counter()

    def on_train_batch_end(self, run, step, loss):
        self.ends.append(time.perf_counter())

    def on_evaluate_start(self, run):
        self.eval_start = time.perf_counter()

    def on_evaluate_end(self, run):
        if self.eval_seconds is None:
            self.eval_seconds = time.perf_counter() - self.eval_start


def measure(mode: str, precision: str, images: int, warmup: int, out: str) -> dict:
    cfg = trainrig.load_config(ROOT / "configs" / "fashion_resnet18_best.yaml", [
        f"model.compile={mode}", f"precision={precision}", f"data.subset={images}", "epochs=1", "eval.test=false",
        "model.ema.decay=null", "eval.tta=none", f"out_dir={out}", f"name={mode}-{precision}"])
    clock = StepClock()
    trainrig.fit(cfg, progress="off", callbacks=[clock])
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])][warmup:]
    batch = cfg.data.batch_size
    return {"mode": mode, "precision": precision, "first_step": clock.ends[0] - clock.start,
            "images_per_s": batch / statistics.median(steps), "first_val": clock.eval_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["false", "default"])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--images", type=int, default=64 * 40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="compile-speed-")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    runs = [measure(m, p, args.images, args.warmup, f"{out}/{r}") for r in range(args.repeats)
            for p in args.precisions for m in (args.modes if r % 2 == 0 else args.modes[::-1])]
    rows = []
    for p in args.precisions:
        for m in args.modes:
            mine = [r for r in runs if r["mode"] == m and r["precision"] == p]
            speeds = [r["images_per_s"] for r in mine]
            rows.append({**mine[0], "images_per_s": statistics.median(speeds), "low": min(speeds), "high": max(speeds)})
    print(f"\n| precision | model.compile | first step (s) | images/s after warm-up: median of {args.repeats} (range) "
          f"| vs eager | first validation pass (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        eager = next(e for e in rows if e["precision"] == r["precision"] and e["mode"] == "false")
        print(f"| {r['precision']} | {r['mode']} | {r['first_step']:.1f} | {r['images_per_s']:.0f} ({r['low']:.0f}-"
              f"{r['high']:.0f}) | {r['images_per_s'] / eager['images_per_s']:.2f}x | {r['first_val']:.1f} |")

if __name__ == "__main__":
    main()
