"""DDP scaling on CPU: training images/s of 1 process x 1 thread vs 2 DDP processes x 1 thread (gloo).

Both train the FashionMNIST ResNet18 of the default config through ``trainrig.fit`` on real data;
efficiency = thr2 / (2 x thr1). By default each process trains on the same batch (128: weak scaling, the
usual way DDP efficiency is quoted, so the global batch of the 2-process run is 256); ``--strong`` keeps
the global batch at 128 instead (64 per process), which also measures how much slower a CPU convolution
is per image at half the batch. Run: ``python benchmarks/ddp_scaling.py [--strong]``.
"""
from __future__ import annotations

import argparse
import tempfile

import trainrig
from trainrig.config import default_config_path


def images_per_s(overrides: list[str]) -> float:
    cfg = trainrig.load_config(default_config_path(), overrides)
    result = trainrig.fit(cfg, progress="off")
    return result.history[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=7680, help="training images per measurement")
    parser.add_argument("--batch", type=int, default=128, help="batch per process of the 1-process run")
    parser.add_argument("--strong", action="store_true", help="same global batch for both runs")
    args = parser.parse_args()
    two_batch = args.batch if args.strong else 2 * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"out_dir={tmp}", "epochs=1", "threads=1", f"data.subset={args.images}", "data.test_subset=512",
                  "sched.name=none"]
        one = images_per_s(common + ["name=one", "strategy=single", f"data.batch_size={args.batch}"])
        print(f"1 process  x 1 thread : {one:7.1f} images/s (batch {args.batch})", flush=True)
        two = images_per_s(common + ["name=two", "strategy=ddp", "devices=2", "backend=gloo",
                                     f"data.batch_size={two_batch}"])
        print(f"2 DDP procs x 1 thread: {two:7.1f} images/s (gloo, global batch {two_batch}, "
              f"{two_batch // 2} per process)")
        print(f"scaling efficiency thr2 / (2 x thr1) = {two / (2 * one):.3f}")


if __name__ == "__main__":
    main()
