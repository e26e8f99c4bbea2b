"""Recipe experiments that chose the default config: accuracy per minute on real FashionMNIST.

Each recipe is a list of ``--set`` overrides on ``configs/fashion_resnet18.yaml``; the script trains it
with ``trainrig.fit`` and prints test accuracy and minutes per epoch. Results measured on the 2-core
CPU are recorded in benchmarks/RESULTS.md. Run: ``python benchmarks/recipe.py default adam_const``.
"""
from __future__ import annotations

import argparse

import trainrig
from trainrig.config import default_config_path

RECIPES: dict[str, list[str]] = {
    # the shipped default: AdamW + one-cycle schedule + horizontal flips, batch 128, 5 epochs
    "default": [],
    # the plain baseline of the issue: Adam 1e-3, batch 128, no schedule, no augmentation
    "adam_const": ["optim.name=adam", "optim.lr=1e-3", "optim.weight_decay=0", "sched.name=none", "data.flip=false"],
    # SGD one-cycle with label smoothing and flip/crop (the issue measured 90.4% after 5 epochs)
    "sgd_onecycle_aug": ["optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=5e-4", "optim.nesterov=true",
                         "optim.label_smoothing=0.1", "sched.name=onecycle", "data.crop_padding=2"],
    # the default with cosine decay instead of one-cycle
    "adamw_cosine": ["sched.name=cosine", "sched.warmup_epochs=0.3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipes", nargs="+", choices=sorted(RECIPES))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every recipe")
    args = parser.parse_args()
    for name in args.recipes:
        cfg = trainrig.load_config(default_config_path(), RECIPES[name] + [f"name=recipe_{name}"] + args.extra)
        result = trainrig.fit(cfg, progress="lines")
        accs = ", ".join(f"{100 * r['test_acc']:.2f}" for r in result.history)
        minutes = sum(r["seconds"] for r in result.history) / 60
        print(f"{name}: test acc per epoch [{accs}] in {minutes:.1f} min; best {100 * result.best_test_acc:.2f}%",
              flush=True)


if __name__ == "__main__":
    main()
