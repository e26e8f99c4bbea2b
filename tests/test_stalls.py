"""No silent hangs, no work lost to preemption.

A stopped peer or a stuck data loader ends the run within dist_timeout_s plus a margin, with one line that
names the rank and where it was, every process's stacks in log.txt and no process left behind. SIGTERM /
SIGUSR1 stop every rank at the same step with a checkpoint there; ``--resume auto`` then finishes the run
bitwise equal to an uninterrupted one."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import trainrig
from trainrig.training import checkpoint

from test_faults import assert_same_run

TIMEOUT = 6  # dist_timeout_s of the stall tests


def _config(tmp_path: Path, name: str, **extra) -> Path:
    body = {"name": name, "out_dir": str(tmp_path / "runs"), "threads": 1, "epochs": 2,
            "data": {"name": "synthetic", "synthetic_train": 128, "synthetic_test": 64, "batch_size": 16,
                     "flip": True, "crop_padding": 2},
            "model": {"class_path": "user_models.TinyNet"}, "optim": {"name": "adam"}, "sched": {"name": "cosine"},
            "checkpoint": {"keep_last": 10}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _fit(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainrig", "fit", "-c", str(config), "--quiet", *extra]


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_a_stopped_rank_ends_the_run_with_one_line_stacks_and_no_orphans(tmp_path):
    marker = tmp_path / "stopped.txt"
    config = _config(tmp_path, "stall", strategy="ddp", devices=2, dist_timeout_s=TIMEOUT, callbacks=[
        {"class_path": "faults.SignalSelf", "init_args": {"rank": 1, "step": 3, "marker": str(marker)}}])
    proc = subprocess.Popen(_fit(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=TIMEOUT + 150)
    ended = time.time()
    assert proc.returncode == 1, stderr[-3000:]
    stopped_for = ended - marker.stat().st_mtime
    assert stopped_for < TIMEOUT + 30, stopped_for
    line = _one_error_line(stderr)
    assert line.startswith("error: rank 1 ") and "rank 0 waited" in line and "backward" in line, line
    log = (tmp_path / "runs" / "stall" / "log.txt").read_text()
    assert f"watchdog: {line.removeprefix('error: ')}; stacks of pid" in log
    assert log.count("most recent call first") >= 3  # rank 0's threads, then rank 1's (continued to write them)
    assert "_forward_backward" in log or "on_train_batch_end" in log
    assert _gone(int(marker.read_text())), "the stopped rank outlived the run"


def test_a_stuck_data_loader_ends_a_single_process_run(tmp_path):
    config = _config(tmp_path, "loader", dist_timeout_s=TIMEOUT, callbacks=[
        {"class_path": "faults.StopLoaderWorkers", "init_args": {"step": 3}}])
    config.write_text(config.read_text().replace("batch_size: 16", "batch_size: 16\n  loader: dataloader\n"
                                                 "  num_workers: 1"))
    started = time.monotonic()
    proc = subprocess.run(_fit(config), capture_output=True, text=True, timeout=TIMEOUT + 150)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - started < TIMEOUT + 60
    line = _one_error_line(proc.stderr)
    # workers stopped after step 3; batches they had already prefetched may still be trained on
    found = re.fullmatch(r"error: the run made no progress for (\d+) s \(in the data loader, step (\d+)\)", line)
    assert found and int(found[1]) >= TIMEOUT and int(found[2]) >= 3, line
    assert "in the data loader" in (tmp_path / "runs" / "loader" / "log.txt").read_text()
    leftovers = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers  # no loader worker outlived the run


def _steps(run_dir: Path, rank: int = 0) -> list[int]:
    return [int(line.split()[1]) for line in (run_dir / f"steps-rank{rank}.log").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run, single process or spawned ddp, trained once for the cases that compare with it."""
    done: dict[bool, trainrig.FitResult] = {}
    folder = tmp_path_factory.mktemp("uninterrupted")

    def get(ddp: dict) -> trainrig.FitResult:
        if bool(ddp) not in done:
            done[bool(ddp)] = trainrig.fit(trainrig.load_config(_config(folder, "full", **ddp)), progress="off")
        return done[bool(ddp)]
    return get


@pytest.mark.parametrize("how", ["single", "spawned ddp", "one ddp rank, SIGUSR1", "single, a STOP file (ray's way)"])
def test_a_preempted_run_saves_where_it_stops_and_resumes_bitwise(tmp_path, uninterrupted, how):
    """SIGTERM to the launcher, SIGUSR1 to one rank, or a STOP file in the run folder (what the Ray driver
    writes on a signal, and anyone may): every rank stops at one step, saved, and the run resumes bitwise."""
    ddp = {"strategy": "ddp", "devices": 2} if "ddp" in how else {}  # ranks agreeing: the SIGUSR1 case
    signum = signal.SIGUSR1 if "SIGUSR1" in how or "STOP" in how else signal.SIGTERM
    marker, ready = tmp_path / "signalled.txt", tmp_path / "ready"
    log = [{"class_path": "faults.StepLog"}]
    if "SIGUSR1" in how:  # one rank gets the signal, from within
        signal_at = [{"class_path": "faults.SignalSelf", "init_args": {
            "rank": 1, "step": 5, "marker": str(marker), "sig": "SIGUSR1"}}]
    else:  # the launcher gets it while rank 0 holds after step 3: the steps' speed does not decide the stop
        signal_at = [{"class_path": "faults.HoldAt", "init_args": {"step": 3, "ready": str(ready)}}]
    config = _config(tmp_path, "pre", **ddp, callbacks=log + signal_at)
    run_dir = tmp_path / "runs" / "pre"
    proc = subprocess.Popen(_fit(config, "--resume", "auto"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if "SIGUSR1" not in how:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if "STOP" in how:
            (run_dir / "STOP").write_text("USR1\n")
        else:
            proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt", mmap=True)
    done = _steps(run_dir)
    assert done[-1] == saved["global_step"] and 0 < saved["batch"] < 8, (done, saved["global_step"])  # none lost
    if ddp:
        assert _steps(run_dir, 1)[-1] == saved["global_step"]  # both ranks stopped at that step
    name = signal.Signals(signum).name
    assert f"stopped by {name} at epoch 1 step {saved['global_step']}: saved {run_dir / 'checkpoints' / 'last.pt'}" \
           in stderr, stderr[-3000:]
    trainrig.fit(trainrig.load_config(config), resume="auto", progress="off")  # the same command, in this process
    assert_same_run(uninterrupted(ddp), run_dir)
    assert not (run_dir / "STOP").exists()  # the resumed run did not stop on the old request


def test_the_ray_driver_turns_a_signal_into_a_stop_file_and_a_stop(tmp_path):
    """launcher: ray's driver side (the workers' side is the STOP-file case above; the whole path was run by
    hand on a local Ray, docs/ray.md): a signal to `trainer fit` becomes the STOP file rank 0 reads, the file
    is gone afterwards, and the driver reports the stop - or that nothing had been saved yet."""
    import os

    from trainrig.parallel import ray_train as ray_launch
    from trainrig.training.preempt import Preempted

    run_dir = tmp_path / "run"
    with ray_launch._stop_file_on_signal(run_dir) as asked:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled at the next bytecode boundary, in this thread
        deadline = time.monotonic() + 5
        while not asked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (run_dir / "STOP").read_text() == "USR1\n"
    assert asked == [signal.SIGUSR1] and not (run_dir / "STOP").exists()
    cfg = trainrig.load_config(None, ["epochs=2"])
    with pytest.raises(Preempted, match="stopped by SIGUSR1 before training began: nothing to save"):
        ray_launch._raise_if_stopped(cfg, run_dir, signal.SIGUSR1)
