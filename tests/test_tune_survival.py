"""Ray Tune searches that survive: Ctrl-C and --resume, a killed trial worker, PBT's restores (a module of
its own so that pytest-xdist runs it beside test_tune.py)."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import trainrig
from trainrig.search import tune

from test_tune import SPACE, tune_cfg

# ~2 min of Ray Tune (two CLI searches, each with a Ray of its own): the cluster tier, so that make test stays
# under 8 min on a 2-core AVX2 EPYC too (481 s with these tests there).
pytestmark = pytest.mark.cluster


def _started(run: Path) -> float:
    """When a trial's fit began (it writes config.yaml first): Ray names a searcher's trials by a random id,
    so their folders do not sort in the order they ran."""
    return (run / "config.yaml").stat().st_mtime_ns if (run / "config.yaml").is_file() else math.inf


def test_interrupted_optuna_search_resumes_each_trial_once(tmp_path):
    """Optuna's TPE, 4 trials one at a time: Ctrl-C after a trial has ended, --resume finishes the search
    without running an ended trial again, and best.yaml fits."""
    args = ["-m", "trainrig", "tune", "-c", "configs/smoke.yaml", "--quiet", "--set", "model.class_path=user_models.TinyNet",
            "--set", "data.synthetic_train=96", "--set", "epochs=2", "--set", f"tune.storage_path={tmp_path}",
            "--set", "tune.name=exp", "--set", "tune.searcher=optuna", "--set", "tune.n_initial_points=2",
            "--set", "tune.num_samples=4", "--set", f"tune.search_space={SPACE}", "--set", "tune.max_concurrent=1"]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    deadline = time.monotonic() + 240
    finished: list[Path] = []
    while time.monotonic() < deadline and len(finished) < 1:
        time.sleep(1)
        runs = sorted((tmp_path / "exp").glob("_trial_*/fit"), key=_started)
        # one trial at a time: a trial has ended (for Ray too) once the next one has started
        finished = [run / "metrics.csv" for run in runs[:-1] if (run / "metrics.csv").is_file()
                    and len((run / "metrics.csv").read_text().splitlines()) == 3]
    assert finished, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C: Ray saves the experiment state and exits
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]  # not 0: the search is not complete
    said = " ".join(err.split())
    assert re.search(r"interrupted: [123] of 4 trials finished", said), said[-2000:]
    marker = (tmp_path / "exp" / "PARTIAL").read_text()
    assert "of 4 trials finished" in marker and (tmp_path / "exp" / "best.yaml").read_text().startswith("# PARTIAL")
    assert any(r["stop_reason"] == "interrupted" for r in csv.DictReader(open(tmp_path / "exp" / "trials.csv")))
    stamps = {m: m.stat().st_mtime_ns for m in finished}
    resumed = subprocess.run([sys.executable, *args, "--resume"], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "exp" / "trials.csv")))
    assert len(rows) == 4 and all(r["stop_reason"] == "completed" for r in rows)
    for m, stamp in stamps.items():  # finished trials were not run again
        assert m.stat().st_mtime_ns == stamp, m
    for trial in (tmp_path / "exp").glob("_trial_*"):
        assert [p.name for p in trial.glob("fit*")] == ["fit"]  # resumed in place, never restarted elsewhere
        assert len((trial / "fit" / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs, once each
        ran = yaml.safe_load((trial / "fit" / "config.yaml").read_text())  # reused actors: each its own params
        assert ran["optim"]["lr"] == pytest.approx(json.loads((trial / "params.json").read_text())["optim.lr"])
    best = yaml.safe_load((tmp_path / "exp" / "best.yaml").read_text())
    assert best["tune"]["search_space"] == {} and best["epochs"] == 2
    assert not (tmp_path / "exp" / "PARTIAL").exists()
    assert not (tmp_path / "exp" / "best.yaml").read_text().startswith("# PARTIAL")
    fitted = trainrig.fit(trainrig.load_config(tmp_path / "exp" / "best.yaml", [f"out_dir={tmp_path / 'runs'}",
                                                                               "epochs=1"]), progress="off")
    assert [row["epoch"] for row in fitted.history] == [1] and fitted.run_dir.is_relative_to(tmp_path / "runs")


def test_a_killed_trial_worker_restarts_from_its_last_checkpoint(tmp_path):
    """tune.max_failures: the trial reaching its 7th step (epoch 3 of 3 steps each) SIGKILLs its own worker
    process; Ray restarts the trial from its epoch-2 checkpoint and it runs each epoch once."""
    marker = tmp_path / "killed.txt"
    kill = f"[{{class_path: faults.KillOnce, init_args: {{rank: 0, step: 7, marker: '{marker}'}}}}]"
    cfg = tune_cfg(tmp_path, "epochs=3", "tune.searcher=random", "tune.num_samples=1", "tune.max_failures=1",
                   "tune.search_space={optim.lr: {loguniform: [1.0e-4, 3.0e-2]}}", f"callbacks={kill}")
    result = tune.run(cfg, verbose=False)
    assert marker.read_text().startswith("killed rank 0 at step 7")
    assert not result.interrupted and result.finished == result.expected == 1
    rows = list(csv.DictReader(open(result.experiment_dir / "trials.csv")))
    assert [(r["stop_reason"], r["epochs_run"]) for r in rows] == [("completed", "3")]
    for trial in result.experiment_dir.glob("_trial_*"):
        epochs = [r["epoch"] for r in csv.DictReader(open(trial / "fit" / "metrics.csv"))]
        assert epochs == ["1", "2", "3"], trial.name  # the killed trial did not start over


def test_pbt_exploits_and_continues_from_the_donor_with_a_new_lr(tmp_path):
    """4 trials of 3 epochs, a decision every epoch: the bottom half copy a top trial's checkpoint and go on with a
    perturbed lr, set in place in the restored optimizer; trials.csv records it; best.yaml fits. Synchronous PBT:
    asynchronous decisions depend on which trial reports when (fast trials may never meet a lower-ranked live
    one: 1 run in 10 saw no exploit), synchronous ones only on the scores."""
    cfg = tune_cfg(tmp_path, "epochs=3", "tune.searcher=random", "tune.num_samples=4", "tune.scheduler=pbt",
                   "tune.pbt.quantile_fraction=0.5", "tune.pbt.resample_probability=0", "tune.pbt.synch=true",
                   "tune.search_space={optim.lr: {loguniform: [1.0e-5, 3.0e-2]}}")
    result = tune.run(cfg, verbose=False)
    rows = list(csv.DictReader(open(result.experiment_dir / "trials.csv")))
    assert len(rows) == 4 and all(r["epochs_run"] == "3" for r in rows)
    exploited = [r for r in rows if r["pbt_history"]]
    assert exploited, "PBT never exploited"
    assert all("from " in r["pbt_history"] and "optim.lr=" in r["pbt_history"] for r in exploited)
    logs = " ".join((t / "fit" / "log.txt").read_text() for t in result.experiment_dir.glob("_trial_*"))
    restored = re.findall(r"pbt: continuing \S+ with optim\.lr=([0-9.e-]+) \(was ([0-9.e-]+)\)", logs)
    assert restored and all(float(new) != float(old) for new, old in restored)
    assert "(resumed after epoch" in logs  # the donor's checkpoint was restored, not a fresh start
    best = trainrig.load_config(result.best_config_path, [f"out_dir={tmp_path / 'runs'}", "epochs=1"])
    assert trainrig.fit(best, progress="off").history
