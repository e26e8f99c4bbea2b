"""ASHA vs FIFO: the same search (same seed, so the same trials) on a real FashionMNIST subset.

HyperOpt with ``n_initial_points = num_samples`` draws every trial from its seeded random start, so
both runs train exactly the same configurations; only the scheduler differs. Prints the wall time of
each, their ratio, and for each the trial chosen on validation accuracy (``tune.metric: val_acc``) with its
checkpoint's test accuracy, measured once after the search. ``--reduction-factor 2 3 4`` runs FIFO once and ASHA
once per factor (default: the config's). Run: ``python benchmarks/tune_asha.py``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trainrig
from trainrig.search import tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="epochs = ASHA's max_t (default: the config's)")
    parser.add_argument("--subset", type=int, default=1000)
    parser.add_argument("--reduction-factor", type=float, nargs="+", default=None)
    args = parser.parse_args()
    config = Path(__file__).parents[1] / "configs" / "tune_asha.yaml"
    base = trainrig.load_config(config)
    epochs = args.epochs or base.tune.max_t
    factors = args.reduction_factor or [base.tune.reduction_factor]
    runs = [("fifo", "tune.scheduler=fifo")] + [(f"asha rf {rf:g}", f"tune.reduction_factor={rf}") for rf in factors]
    results = {}
    tune.start_ray(base.tune.address, base.tune.object_store_mb)  # outside the timings: the runs share one Ray
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, setting) in enumerate(runs):
            scheduler = "fifo" if label == "fifo" else "asha"
            cfg = trainrig.load_config(config, [
                f"tune.scheduler={scheduler}", setting, f"tune.name=run{i}", f"tune.storage_path={tmp}",
                f"tune.num_samples={args.samples}", f"tune.n_initial_points={args.samples}", "tune.seed=0",
                f"epochs={epochs}", f"tune.max_t={epochs}", f"data.subset={args.subset}",
                f"data.test_subset={args.subset // 2}"])
            start = time.perf_counter()
            result = tune.run(cfg, verbose=False)
            wall = time.perf_counter() - start
            trial_epochs = sorted((int(t["epochs_run"]) for t in result.trials), reverse=True)
            best = result.best_metrics["val_acc"]  # the trial chosen on validation ...
            test = result.best_metrics["test_acc"]  # ... and its checkpoint's test accuracy, read once
            results[label] = (wall, test)
            print(f"{label:>10}: {wall:6.1f} s, {sum(trial_epochs)} trial-epochs {trial_epochs}, chosen trial: "
                  f"val accuracy {100 * best:.2f}%, test accuracy {100 * test:.2f}%", flush=True)
    fifo_t, fifo_acc = results.pop("fifo")
    for label, (wall, acc) in results.items():
        print(f"{label}: speed-up over FIFO {fifo_t / wall:.2f}x; the chosen trial's test accuracy - FIFO's = "
              f"{100 * (acc - fifo_acc):+.2f} points")


if __name__ == "__main__":
    main()
