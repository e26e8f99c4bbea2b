"""Minutes (and epochs) to 91.5%, 92.5% and 93.5% test accuracy on real FashionMNIST, per recipe and seed, with
and without flip test-time augmentation, beside each run's honest figure (the test accuracy of the checkpoint
the validation split chose, as fit reports it) and its minutes.

The clock starts when ``trainrig.fit`` is called (data decoding and model building count) and is read at
every epoch end. Each epoch is also evaluated with the other eval.tta setting than the config's, on the
side: that evaluation's time is taken off the clock, so the minutes are those of the config as it is.

  python benchmarks/time_to_accuracy.py                      # the default, 3-epoch and best recipes, seeds 0 1
  python benchmarks/time_to_accuracy.py --config configs/fashion_resnet18_best.yaml --seeds 0
  python benchmarks/time_to_accuracy.py --config configs/fashion_resnet18.yaml --set epochs=3 --targets 91.5
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import trainrig
from trainrig.training.loop import evaluate

ROOT = Path(__file__).resolve().parent.parent
OTHER = {"none": "flip", "flip": "none"}


class Clock(trainrig.Callback):
    """Per epoch: seconds since ``started`` less the side evaluations, accuracy with and without flips."""

    def __init__(self, started: float):
        self.started, self.side, self.rows = started, 0.0, []
        self.other: float | None = None

    def on_evaluate_start(self, run):  # after the weight average (if any) was swapped in
        begin = time.perf_counter()
        tta = OTHER[run.cfg.eval.tta]
        self.other = evaluate(run.strategy.net, run.test, run.strategy.reduce, precision=run.cfg.precision,
                              tta=tta)["test_acc"]
        self.side += time.perf_counter() - begin

    def on_epoch_end(self, run, row):
        accs = {run.cfg.eval.tta: row["test_acc"], OTHER[run.cfg.eval.tta]: self.other}
        seconds = time.perf_counter() - self.started - self.side
        self.rows.append({"epoch": int(row["epoch"]), "minutes": seconds / 60, "none": accs["none"],
                          "flip": accs["flip"]})
        print(f"  epoch {int(row['epoch'])}: {seconds / 60:.2f} min, test acc {100 * accs['none']:.2f}% "
              f"(flip tta {100 * accs['flip']:.2f}%)", flush=True)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def first_reaching(rows: list[dict], view: str, target: float) -> str:
    for r in rows:
        if 100 * r[view] >= target:
            return f"{r['minutes']:.1f} min (epoch {r['epoch']})"
    return "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=[str(ROOT / "configs" / f"fashion_resnet18{v}.yaml")
                                                         for v in ("", "_3epochs", "_best")])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--targets", type=float, nargs="+", default=[91.5, 92.5, 93.5], help="test accuracy, percent")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None, help="parent of the run folders (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="time-to-accuracy-")
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; config {args.config} {' '.join(args.overrides)}; runs in {out}", flush=True)
    summary = []
    for config in args.config:
        for seed in args.seeds:
            name = f"{Path(config).stem}-seed{seed}"
            cfg = trainrig.load_config(config, [*args.overrides, f"seed={seed}", f"out_dir={out}",
                                                "eval.test_every_epoch=true",  # the test curve: DAWNBench's clock
                                                f"name={name}"])
            print(f"{name} ({cfg.epochs} epochs, eval.tta {cfg.eval.tta}):", flush=True)
            clock = Clock(time.perf_counter())
            result = trainrig.fit(cfg, progress="off", callbacks=[clock])
            minutes = (time.perf_counter() - clock.started - clock.side) / 60
            print(f"  honest test acc {100 * result.test_acc:.2f}% (epoch {result.best_epoch}, chosen on validation),"
                  f" {minutes:.1f} min", flush=True)
            summary.append((Path(config).stem, seed, cfg.epochs, cfg.eval.tta, clock.rows, result.test_acc, minutes))
    head = " | ".join(f"to {t}% ({v})" for t in args.targets for v in ("no tta", "flip"))
    print(f"\n| recipe | seed | epochs | honest test acc (its tta) | minutes | {head} |")
    print("|" + "---|" * (5 + 2 * len(args.targets)))
    for recipe, seed, epochs, tta, rows, honest, minutes in summary:
        cells = [first_reaching(rows, v, t) for t in args.targets for v in ("none", "flip")]
        print(f"| {recipe} | {seed} | {epochs} | {100 * honest:.2f}% ({tta}) | {minutes:.1f} | {' | '.join(cells)} |")

if __name__ == "__main__":
    main()
