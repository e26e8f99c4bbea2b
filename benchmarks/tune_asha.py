"""ASHA vs FIFO: the same search (same seed, so the same trials) on a real FashionMNIST subset.

HyperOpt with ``n_initial_points = num_samples`` draws every trial from its seeded random start, so
both runs train exactly the same configurations; only the scheduler differs. Prints the wall time of
each, their ratio and the best accuracy of each. Run: ``python benchmarks/tune_asha.py``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trainrig
from trainrig import tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--subset", type=int, default=1000)
    args = parser.parse_args()
    config = Path(__file__).parents[1] / "configs" / "tune_asha.yaml"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in ("fifo", "asha"):
            cfg = trainrig.load_config(config, [
                f"tune.scheduler={scheduler}", f"tune.name={scheduler}", f"tune.storage_path={tmp}",
                f"tune.num_samples={args.samples}", f"tune.n_initial_points={args.samples}", "tune.seed=0",
                f"epochs={args.epochs}", f"tune.max_t={args.epochs}", f"data.subset={args.subset}",
                f"data.test_subset={args.subset // 2}"])
            start = time.perf_counter()
            result = tune.run(cfg, verbose=False)
            wall = time.perf_counter() - start
            epochs = sum(int(t["epochs_run"]) for t in result.trials)
            best = max(float(t["best_accuracy"]) for t in result.trials)
            results[scheduler] = (wall, best)
            print(f"{scheduler:>4}: {wall:6.1f} s, {epochs} trial-epochs, best accuracy {100 * best:.2f}%", flush=True)
    (fifo_t, fifo_acc), (asha_t, asha_acc) = results["fifo"], results["asha"]
    print(f"ASHA speed-up {fifo_t / asha_t:.2f}x; best accuracy ASHA - FIFO = {100 * (asha_acc - fifo_acc):+.2f} points")


if __name__ == "__main__":
    main()
