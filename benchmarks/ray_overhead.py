"""What launcher: ray costs against the local spawn launcher: the same DDP fit with 2 ranks.

  startup      seconds from the command to the first training step (the 'run folder:' line, printed just
               before it): imports, for ray also starting Ray and its worker actors
  epoch        seconds per epoch (metrics.csv), and the difference: the per-epoch overhead

Usage: python benchmarks/ray_overhead.py [--epochs 3] [--set KEY=VALUE ...]   (synthetic data by default)
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BASE = ["strategy=ddp", "devices=2", "threads=1", "data.name=synthetic", "data.synthetic_train=2048",
        "data.synthetic_test=512", "data.batch_size=64", "optim.name=adam", "sched.name=none"]


def run(name: str, extra: list[str], out: Path, epochs: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "trainrig", "fit", "--set", f"out_dir={out}", "--set", f"name={name}",
           "--set", f"epochs={epochs}", *(x for o in BASE + extra for x in ("--set", o))]
    start, first = time.time(), {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def watch() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "run folder:" in line and "t" not in first:
                first["t"] = time.time()
    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    proc.wait()
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}")
    rows = list(csv.DictReader(open(out / name / "metrics.csv")))
    epochs_s = [float(r["seconds"]) for r in rows]
    return {"startup": first.get("t", float("nan")) - start, "epoch": sum(epochs_s[1:]) / max(1, len(epochs_s) - 1),
            "first_epoch": epochs_s[0], "total": time.time() - start, "val_acc": float(rows[-1]["val_acc"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    local = run("local", args.overrides, out, args.epochs)
    ray = run("ray", ["launcher=ray", "ray.num_workers=2", *args.overrides], out, args.epochs)
    print(f"{'':8} {'startup s':>10} {'1st epoch s':>12} {'epoch s':>8} {'total s':>8} {'val acc':>9}")
    for name, r in (("local", local), ("ray", ray)):
        print(f"{name:8} {r['startup']:10.1f} {r['first_epoch']:12.2f} {r['epoch']:8.2f} {r['total']:8.1f} "
              f"{r['val_acc']:9.4f}")
    print(f"launcher: ray costs {ray['startup'] - local['startup']:+.1f} s before the first step and "
          f"{ray['epoch'] - local['epoch']:+.2f} s per epoch (epochs 2..{args.epochs}); {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
