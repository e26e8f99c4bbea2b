"""Fault tolerance: mid-epoch checkpoints, kill -9 and --resume auto, restarts of a DDP group, unreadable
checkpoints and a full disk. "Equal to the uninterrupted run" is bitwise on CPU: the same process count and
threads computing the same steps."""
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import trainrig
from trainrig.training import checkpoint
from trainrig.cli import app

from conftest import RESNET, assert_exit_2

RECIPE = ["data.flip=true", "data.crop_padding=2", "sched.name=cosine", "data.synthetic_train=128",
          "data.batch_size=16", "epochs=3"]  # 8 steps an epoch, augmentation and a per-step schedule


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


def assert_same_run(a: trainrig.FitResult, b_dir: Path) -> None:
    """Final weights bitwise, and the per-epoch metrics of the resumed run are the uninterrupted run's."""
    wa, wb = weights(a.run_dir), weights(b_dir)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    saved = checkpoint.load(b_dir / "checkpoints" / "last.pt")["history"]
    for ra, rb in zip(a.history, saved, strict=True):
        for key in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert ra[key] == rb[key], (ra["epoch"], key)


def test_mid_epoch_checkpoints_resume_exactly_and_keep_what_is_asked(tiny_cfg):
    full = trainrig.fit(tiny_cfg(*RECIPE, "name=full"), progress="off")
    cfg = tiny_cfg(*RECIPE, "name=part", "checkpoint.every_n_steps=5", "checkpoint.keep_last=2",
                   "checkpoint.save_top_k=1")

    class Crash(Exception):
        pass

    class CrashAt(trainrig.Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, run, step, loss):
            if run.state.global_step == self.step:
                raise Crash

    # saves at steps 5, 8 (epoch 1's end), 10, 15, 16, 20, 24: each crash loses the steps since the last one
    for crash, saved_at in ((7, 5), (9, 8), (22, 20)):  # mid-epoch, right after an epoch end, mid-epoch
        with pytest.raises(Crash):
            trainrig.fit(cfg, resume="auto", progress="off", callbacks=[CrashAt(crash)])
        saved = checkpoint.load(full.run_dir.parent / "part" / "checkpoints" / "last.pt", mmap=True)
        assert (saved["global_step"], saved["batch"]) == (saved_at, saved_at - 8 * saved["epoch"])
    resumed = trainrig.fit(cfg, resume="auto", progress="off")
    assert_same_run(full, resumed.run_dir)
    folder = resumed.run_dir / "checkpoints"
    names = sorted(p.name for p in folder.glob("*.pt"))
    best_epoch = max(resumed.history, key=lambda r: r["val_acc"])["epoch"]
    # the 2 newest (epoch 3's end and step 20) + the best epoch's end, beside the stable names
    kept = {"epoch=3-step=24.pt", "epoch=3-step=20.pt", f"epoch={best_epoch}-step={8 * best_epoch}.pt"}
    assert names == sorted(kept | {"last.pt", "best.pt"})
    assert (folder / "last.pt").stat().st_ino == (folder / "epoch=3-step=24.pt").stat().st_ino  # written once
    assert checkpoint.load(folder / "best.pt", mmap=True)["epoch"] == best_epoch


def test_unreadable_newest_checkpoint_falls_back_with_a_warning(tiny_cfg):
    cfg = tiny_cfg(*RECIPE, "epochs=2", "checkpoint.every_n_steps=4", "checkpoint.keep_last=3")
    first = trainrig.fit(cfg, progress="off")
    folder = first.run_dir / "checkpoints"
    newest = folder / "epoch=2-step=16.pt"
    assert newest.samefile(folder / "last.pt")
    with open(newest, "r+b") as f:  # a torn write: the file (and last.pt, the same file) cut in half
        f.truncate(newest.stat().st_size // 2)
    lines: list[str] = []

    class Lines(trainrig.Callback):
        def on_message(self, run, text):
            lines.append(text)

    again = trainrig.fit(cfg, resume="auto", progress="off", callbacks=[Lines()])
    assert any(line.startswith("warning: skipped") and "last.pt" in line for line in lines), lines
    assert any("resumed epoch 2 at batch 4 from epoch=2-step=12.pt" in line for line in lines), lines
    assert (folder / "last.pt.unreadable").is_file() and (folder / "epoch=2-step=16.pt").is_file()
    assert [r["val_acc"] for r in again.history] == [r["val_acc"] for r in first.history]


def test_nothing_readable_is_an_error_that_renames_nothing(tiny_cfg):
    cfg = tiny_cfg("epochs=1", "checkpoint.keep_last=0", "checkpoint.save_top_k=0")
    first = trainrig.fit(cfg, progress="off")
    folder = first.run_dir / "checkpoints"
    for path in folder.glob("*.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(trainrig.errors.CheckpointError, match="no readable checkpoint"):
        trainrig.fit(cfg, resume="auto", progress="off")
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "killed", "out_dir": str(tmp_path / "runs"), "threads": 1, "epochs": 3,
        "data": {"name": "synthetic", "synthetic_train": 128, "synthetic_test": 64, "batch_size": 16,
                 "flip": True, "crop_padding": 2},
        "optim": {"name": "adam"}, "sched": {"name": "cosine"}, "checkpoint": {"every_n_steps": 3}}))
    return [sys.executable, "-m", "trainrig", "fit", "-c", str(config), "--quiet", *extra]


def _newest_step(folder: Path) -> int:
    return max((s for _, s, _ in checkpoint.step_files(folder)), default=0) if folder.is_dir() else 0


def test_kill_9_three_times_and_resume_auto_equals_uninterrupted(tmp_path, tiny_cfg):
    """The job-script loop: the same command after every crash; each SIGKILL lands at a random moment
    after a chosen step (mid-step, mid-save or between), never with a chance to clean up."""
    full = trainrig.fit(tiny_cfg(*RECIPE, "name=full", "data.synthetic_test=64", RESNET), progress="off")
    cmd, rng = _cli(tmp_path, "--resume", "auto"), random.Random(1)  # a ResNet18: steps slow enough to land in
    folder = tmp_path / "runs" / "killed" / "checkpoints"
    for after in (2, 9, 14):  # in epochs 1, 2 and 2-3 (8 steps each); saves every 3 steps and at epoch ends
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _newest_step(folder) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))
        proc.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]  # killed, not finished or failed
    done = subprocess.run([c for c in cmd if c != "--quiet"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(resumed epoch" in done.stderr or "(resumed after epoch 2" in done.stderr, done.stderr  # progress lines
    assert_same_run(full, tmp_path / "runs" / "killed")
    assert not list(folder.glob(".*.tmp"))  # no torn temp file left behind by the kills either


def _full_disk(limit: int):
    """RLIMIT_FSIZE: writing past ``limit`` bytes fails with EFBIG (the signal it would send is ignored) -
    a full disk that even root cannot write past, without mounting anything."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_one_line_and_last_pt_survives(tmp_path):
    cmd = _cli(tmp_path, "--resume", "auto", "--set", "epochs=2")
    trainrig.fit(trainrig.load_config(cmd[cmd.index("-c") + 1], ["epochs=1"]), progress="off")
    folder = tmp_path / "runs" / "killed" / "checkpoints"
    before = (folder / "last.pt").read_bytes()
    size = len(before)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=240, preexec_fn=_full_disk(size // 2))
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    message = resumed.stderr.strip().splitlines()
    assert len(message) == 1 and "cannot write the checkpoint" in message[0] and "are unchanged" in message[0], message
    assert (folder / "last.pt").read_bytes() == before  # still the whole epoch-1 checkpoint
    assert checkpoint.load(folder / "last.pt")["epoch"] == 1
    assert not list(folder.glob(".*.tmp"))


DDP = ["strategy=ddp", "devices=2", "threads=1", "data.synthetic_train=128", "data.synthetic_test=64",
       "data.batch_size=32", "data.flip=true", "epochs=2", "checkpoint.every_n_steps=2"]  # 4 steps an epoch


def test_a_killed_rank_restarts_the_group_spawned_and_under_torchrun(tiny_cfg, tmp_path):
    """Rank 1 is SIGKILLed after step 3 (one step past a save). Spawned with restarts: 1, and torchrun
    --max-restarts 1 running the same command with --resume auto: both resume the group from the step-2
    checkpoint and end with the uninterrupted run's weights. One restart must do: torchrun keeps its store
    across restarts, and a restarted rank used to read the dead attempt's gloo addresses from it (refused or
    hung in 8 of 10 plain-torch runs); trainrig joins through keys new to each attempt (rendezvous.py)."""
    full = trainrig.fit(tiny_cfg(*DDP, "name=full"), progress="off")

    marker = tmp_path / "spawned-killed.txt"
    kill = f"callbacks=[{{class_path: faults.KillOnce, init_args: {{rank: 1, step: 3, marker: '{marker}'}}}}]"
    spawned = trainrig.fit(tiny_cfg(*DDP, "name=spawned", "restarts=1", kill), progress="off")
    assert marker.is_file() and spawned.run_dir.name == "spawned"
    assert_same_run(full, spawned.run_dir)

    marker = tmp_path / "torchrun-killed.txt"
    kill = f"callbacks=[{{class_path: faults.KillOnce, init_args: {{rank: 1, step: 3, marker: '{marker}'}}}}]"
    config = tmp_path / "torchrun.yaml"
    config.write_text(trainrig.config.dump(tiny_cfg(*DDP, "name=torchrun", "dist_timeout_s=60", kill)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",  # a free port
           "--max-restarts", "1", "-m", "trainrig", "fit", "-c", str(config), "--resume", "auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.is_file(), "rank 1 was never killed"
    assert "(resumed epoch 1 at batch 2 from epoch=1-step=2.pt)" in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.count("test accuracy of its checkpoint") == 1  # rank 0 alone reports
    assert_same_run(full, full.run_dir.parent / "torchrun")


def test_an_unwritable_checkpoint_folder_is_one_line_exit_2(tiny_cfg, tmp_path):
    """Where checkpoints cannot go (here a file stands where the folder should be: unwritable even for
    root, who may write into read-only folders) the run stops with one line naming the file, exit 2."""
    cfg = tiny_cfg("epochs=1", "name=blocked")
    (tmp_path / "runs" / "blocked").mkdir(parents=True)
    (tmp_path / "runs" / "blocked" / "checkpoints").write_text("in the way")
    config = tmp_path / "blocked.yaml"
    config.write_text(trainrig.config.dump(cfg))
    result = CliRunner().invoke(app, ["fit", "-c", str(config), "--resume", "auto", "--quiet"])
    assert_exit_2(result, "blocked/checkpoints/epoch=1-step=4.pt: cannot write the checkpoint")
    assert (tmp_path / "runs" / "blocked" / "checkpoints").read_text() == "in the way"
