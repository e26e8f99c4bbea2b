"""Honest evaluation: every choice reads the validation split, the test set is read once at the end, and the
evaluation report (eval.json, report.html) is exact, also under DDP."""
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import trainrig
from trainrig.training import checkpoint
from trainrig import data
from trainrig.cli import app
from trainrig.config import DataConfig
from trainrig.data import synthetic
from trainrig.training.evaluation import evaluate_report
from trainrig.trained.inference import evaluate_checkpoint

from conftest import assert_exit_2, write_idx

runner = CliRunner()


def fashion_files(folder: Path, permute_test: bool = False) -> Path:
    """FashionMNIST-format IDX files of a learnable synthetic set: 300 train, 100 test images; with
    ``permute_test`` the test labels are shuffled (the images and the training files are the same)."""
    tx, ty, vx, vy = synthetic.make(300, 100, seed=1)
    if permute_test:
        vy = vy[torch.randperm(len(vy), generator=torch.Generator().manual_seed(7))]
    folder.mkdir(parents=True)
    for name, t in (("train-images-idx3-ubyte", tx), ("train-labels-idx1-ubyte", ty),
                    ("t10k-images-idx3-ubyte", vx), ("t10k-labels-idx1-ubyte", vy)):
        write_idx(folder / name, t)
    return folder


def honest_cfg(tmp_path, root: Path, *extra: str) -> trainrig.Config:
    return trainrig.load_config(None, [
        "data.name=fashion_mnist", f"data.root={root}", "data.batch_size=32", "data.eval_batch_size=64",
        "epochs=6", "threads=1", f"out_dir={tmp_path / 'runs'}", "name=h", "optim.name=adam", "optim.lr=3e-3",
        "model.class_path=user_models.TinyNet", *extra])


# ----------------------------------------------------------------------------- the test set chooses nothing

def test_no_choice_reads_the_test_set(tmp_path):
    """Early stopping, best.pt and the top-k kept checkpoints are the same when the test labels are permuted;
    only the final test figures change."""
    extra = ("early_stopping.monitor=val_loss", "early_stopping.patience=1", "early_stopping.min_delta=0.05",
             "checkpoint.save_top_k=2", "checkpoint.keep_last=0")
    runs = [trainrig.fit(honest_cfg(tmp_path, fashion_files(tmp_path / name, permute), *extra, f"name={name}"),
                         progress="off") for name, permute in (("plain", False), ("permuted", True))]
    a, b = runs
    assert a.stopped_early is not None and a.stopped_early < 6  # the rule fired ...
    assert b.stopped_early == a.stopped_early and len(b.history) == len(a.history)  # ... at the same epoch
    assert a.history == [{**r, "seconds": s["seconds"], "images_per_s": s["images_per_s"]}
                         for r, s in zip(b.history, a.history)]  # every figure but the clock's
    kept = [sorted(p.name for p in (r.run_dir / "checkpoints").glob("*.pt")) for r in runs]
    assert kept[0] == kept[1] and len(kept[0]) == 4  # best.pt, last.pt and the 2 best epochs
    best = [checkpoint.load(r.run_dir / "checkpoints" / "best.pt") for r in runs]
    assert best[0]["epoch"] == best[1]["epoch"] == a.best_epoch
    assert all(torch.equal(v, best[1]["model"][k]) for k, v in best[0]["model"].items())
    assert a.test["epoch"] == b.test["epoch"] == a.best_epoch
    assert a.test["confusion_matrix"] != b.test["confusion_matrix"]  # the test set did differ


# ----------------------------------------------------------------------------- splits

def test_splits_disjoint_stratified_and_the_same_everywhere(tmp_path):
    labels = torch.arange(1000) % 7
    kept, held = data.holdout(labels, 0.1, 3, "val")
    assert not set(kept) & set(held) and sorted(kept + held) == list(range(1000))
    counts = torch.bincount(labels[held], minlength=7).tolist()
    assert counts == [round(n * 0.1) for n in torch.bincount(labels).tolist()]  # stratified
    assert data.holdout(labels, 0.1, 3, "val") == (kept, held) and data.holdout(labels, 0.1, 4, "val") != (kept, held)
    # the images of each split: disjoint, and equal on 2 DDP ranks, after a resume and in a second run
    root = fashion_files(tmp_path / "f")
    splits = data.load_splits(DataConfig(name="fashion_mnist", root=str(root)))
    train, val = splits.train_images.flatten(1), splits.val_images.flatten(1)
    per_class = torch.bincount(torch.cat([splits.train_labels, splits.val_labels])).tolist()
    assert len(train) + len(val) == 300 and len(splits.test) == 100
    assert torch.bincount(splits.val_labels).tolist() == [round(n * 0.1) for n in per_class]
    assert not {tuple(r.tolist()) for r in train} & {tuple(r.tolist()) for r in val}
    prints = " ".join(data.fingerprint(ds) for ds in (splits.train, splits.val, splits.test))
    spy = "callbacks=[{class_path: faults.SplitPrints}]"
    ddp = trainrig.fit(honest_cfg(tmp_path, root, "strategy=ddp", "devices=2", "epochs=1", spy), progress="off")
    other = trainrig.fit(honest_cfg(tmp_path, root, "epochs=1", "optim.lr=1e-2", spy, "name=other"), progress="off")
    again = trainrig.fit(honest_cfg(tmp_path, root, "epochs=2", "optim.lr=1e-2", spy, "name=other"), resume=True,
                         progress="off")
    lines = [line for run, rank in ((ddp, 0), (ddp, 1), (again, 0))
             for line in (run.run_dir / f"splits-rank{rank}.txt").read_text().splitlines()]
    assert other.run_dir == again.run_dir and len(lines) == 4 and set(lines) == {prints}  # 2 ranks; start, resume


def test_val_fraction_zero_and_old_names_exit_2(tmp_path):
    root = fashion_files(tmp_path / "f")
    base = ["fit", "--quiet", "--set", "data.name=fashion_mnist", "--set", f"data.root={root}",
            "--set", f"out_dir={tmp_path / 'runs'}"]
    assert_exit_2(runner.invoke(app, [*base, "--set", "checkpoint.monitor=test_acc"]),
                  "checkpoint.monitor: test_acc would choose on the test set")
    assert_exit_2(runner.invoke(app, [*base, "--set", "data.val_fraction=0"]),
                  "checkpoint.monitor: val_acc needs a validation split, but data.val_fraction is 0")
    assert_exit_2(runner.invoke(app, [*base, "--set", "data.val_fraction=0", "--set", "checkpoint.monitor=last",
                                      "--set", "early_stopping.monitor=val_acc"]),
                  "early_stopping.monitor: val_acc needs a validation split")
    assert_exit_2(runner.invoke(app, ["tune", "--set", "tune.metric=accuracy"]), "use tune.metric: val_acc")
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_from_before_validation_splits_still_loads(tiny_cfg, tmp_path):
    result = trainrig.fit(tiny_cfg("epochs=1"), progress="off")
    state = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")
    old = dict(state["config"])
    for key in ("early_stopping",):
        old.pop(key)
    old["checkpoint"] = {**old["checkpoint"], "monitor": "test_acc"}
    old["eval"] = {"tta": "none"}
    old["tune"] = {**old["tune"], "metric": "accuracy", "mode": "max"}
    state["config"] = old
    path = tmp_path / "old.pt"
    checkpoint.save(path, state)
    res = evaluate_checkpoint(path, trust_class_path=True)
    assert res["test_samples"] == 64 and res["report"]["samples"] == 64
    trained = trainrig.load_trained(path, trust_class_path=True)
    assert trained.cfg.checkpoint.monitor == "last" and trained.cfg.data.val_fraction == 0


# ----------------------------------------------------------------------------- early stopping

def test_early_stopping_resumes_exactly(tmp_path):
    root = fashion_files(tmp_path / "f")
    stop = ("early_stopping.monitor=val_loss", "early_stopping.patience=1", "early_stopping.min_delta=0.05")
    full = trainrig.fit(honest_cfg(tmp_path, root, *stop, "name=full"), progress="off")
    assert full.stopped_early is not None and full.stopped_early < 6
    marker = tmp_path / "killed"
    kill = f"callbacks=[{{class_path: faults.KillAtEpochEnd, init_args: {{epoch: {full.stopped_early}, " \
           f"marker: '{marker}'}}}}]"
    cfg = honest_cfg(tmp_path, root, *stop, "name=killed", kill)
    config = tmp_path / "killed.yaml"
    config.write_text(trainrig.config.dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "trainrig", "fit", "-c", str(config), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9 and marker.is_file(), proc.stderr[-2000:]
    assert not (tmp_path / "runs" / "killed" / "eval.json").exists()  # it died before the final test
    resumed = trainrig.fit(cfg, resume="auto", progress="off")
    assert resumed.stopped_early == full.stopped_early
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert resumed.test["confusion_matrix"] == full.test["confusion_matrix"] and resumed.test_loss == full.test_loss


# ----------------------------------------------------------------------------- the report

def test_report_equals_a_float64_hand_computation():
    """7 classes, a designed confusion matrix; logits made so that each sample's prediction is the designed one."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(70) % 7
    predicted = torch.where(torch.rand(70, generator=gen) < 0.6, labels, torch.randint(0, 7, (70,), generator=gen))
    logits = torch.randn(70, 7, generator=gen, dtype=torch.float64)
    logits[torch.arange(70), predicted] += 8.0  # randn stays within +-4.5 here: the designed class wins
    assert torch.equal(logits.argmax(1), predicted)
    batches = [(logits[i:i + 16], labels[i:i + 16]) for i in range(0, 70, 16)]  # uneven last batch
    names = [f"c{i}" for i in range(7)]
    rep = evaluate_report(nn.Identity(), batches, names, precision="64-true", mistakes=5, bins=10)
    cm = torch.zeros(7, 7, dtype=torch.float64)
    for t, p in zip(labels.tolist(), predicted.tolist()):
        cm[t, p] += 1
    assert rep["confusion_matrix"] == cm.long().tolist()
    tp = cm.diag()
    precision, recall = tp / cm.sum(0).clamp(min=1), tp / cm.sum(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros(7))
    for c, row in enumerate(rep["per_class"]):
        assert row["support"] == 10 and row["class"] == f"c{c}"
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (float(precision[c]), float(recall[c]), float(f1[c])), rel=1e-6)
    assert rep["accuracy"] == pytest.approx(float(tp.sum() / 70), rel=1e-12)
    assert rep["macro_f1"] == pytest.approx(float(f1.mean()), rel=1e-6)
    top5 = logits.topk(5, dim=1).indices
    assert rep["top5_accuracy"] == pytest.approx(float((top5 == labels[:, None]).any(1).double().mean()), rel=1e-6)
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    assert rep["loss"] == pytest.approx(float(losses.mean()), rel=1e-12)
    conf, pred = logits.softmax(1).max(1)
    bins = (conf * 10).floor().clamp(max=9).long()
    ece = sum(abs(float(((pred == labels).double()[bins == b]).sum() - conf[bins == b].sum())) / 70 for b in range(10))
    assert rep["ece"] == pytest.approx(ece, rel=1e-5)
    worst = losses.argsort(descending=True)[:5].tolist()
    assert [m["index"] for m in rep["mistakes"]] == worst
    assert [m["loss"] for m in rep["mistakes"]] == pytest.approx(losses[worst].tolist(), rel=1e-12)


class _Page(HTMLParser):
    """The figures report.html shows: element id -> text, and the per-class table's cells by class."""

    def __init__(self):
        super().__init__()
        self.ids, self.cells, self.where = {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.where = attrs.get("id") or (attrs.get("class") if tag == "td" else None)

    def handle_data(self, text):
        if self.where in ("accuracy", "macro_f1", "ece", "top5_accuracy"):
            self.ids[self.where] = text
        elif self.where in ("name", "precision", "recall", "f1", "support"):
            self.cells.append((self.where, text))
        self.where = None


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_html_renders_in_chromium_with_the_eval_json_figures(tiny_cfg, tmp_path):
    result = trainrig.fit(tiny_cfg("epochs=1"), progress="off")
    page, ev = result.run_dir / "report.html", json.loads((result.run_dir / "eval.json").read_text())
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and text.count("data:image/png;base64,") == 3
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = _Page()
    found.feed(dom.stdout)
    assert found.ids["accuracy"] == f"{100 * ev['accuracy']:.2f}%" and found.ids["macro_f1"] == f"{ev['macro_f1']:.4f}"
    assert found.ids["top5_accuracy"] == f"{100 * ev['top5_accuracy']:.2f}%"
    expected = [(k, f"{c[k]:.4f}" if k != "support" else str(c[k])) for c in ev["per_class"]
                for k in ("precision", "recall", "f1", "support")]
    assert [cell for cell in found.cells if cell[0] != "name"] == expected
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,1800", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image, ImageStat

    grey = Image.open(shot).convert("L")
    assert grey.size == (1200, 1800) and ImageStat.Stat(grey).stddev[0] > 20  # text, tables, pictures: not blank
    rebuilt = runner.invoke(app, ["report", str(result.run_dir)])
    no_pictures = lambda html: re.sub(r"base64,[A-Za-z0-9+/=]+", "", html)  # noqa: E731 - replotted PNGs
    assert rebuilt.exit_code == 0 and no_pictures(page.read_text()) == no_pictures(text)  # the same page again
    assert math.isfinite(ev["ece"]) and len(ev["mistakes"]) == 16
