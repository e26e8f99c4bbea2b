"""Lost work per failure: SIGKILL (or SIGTERM: a preemption) `trainer fit --resume auto` at random moments, run
the same command again, and measure what each cost (the last attempt is stopped once it has resumed).

  redone   seconds of training between the newest checkpoint written before the kill and the kill: the
           work the restarted run does again; with --signal TERM also in steps (the steps the stopped
           attempt finished beyond its last checkpoint, from steps.csv written every step)
  stop     --signal TERM: seconds from the signal to the process's exit (finishing the step, saving)
  restart  seconds from relaunching the command to the resumed run's first step (imports, data, model,
           reading the checkpoint)

By default the packaged config (ResNet18 on the real FashionMNIST) with the checkpoint defaults
(every_minutes: 5, and every epoch end). Usage:
  python benchmarks/lost_work.py [--kills 3] [--window 20 240] [--signal KILL|TERM] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def launch(cmd: list[str]) -> tuple[subprocess.Popen, dict[str, float]]:
    """Start the command; note when its 'run folder:' line (training starts next) appears."""
    seen: dict[str, float] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def watch() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            if line.startswith("run folder:") and "started" not in seen:
                seen["started"] = time.time()
                seen["resumed"] = float("(resumed" in line)
    threading.Thread(target=watch, daemon=True).start()
    return proc, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--window", type=float, nargs=2, default=(20.0, 240.0),
                        help="each kill lands this many seconds (uniform) after the attempt's first step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.signal == "TERM":
        args.overrides.append("log_every_n_steps=1")  # steps.csv then names every finished step
    rng = random.Random(args.seed)
    out = Path(tempfile.mkdtemp(prefix="lost-work-"))
    cmd = [sys.executable, "-m", "trainrig", "fit", "--resume", "auto", "--set", f"out_dir={out}",
           "--set", "name=run", *(x for o in args.overrides for x in ("--set", o))]
    last = out / "run" / "checkpoints" / "last.pt"
    rows = []
    for i in range(args.kills + 1):
        launched = time.time()
        proc, seen = launch(cmd)
        while "started" not in seen and proc.poll() is None:
            time.sleep(0.05)
        restart = seen.get("started", time.time()) - launched
        if i == args.kills:  # only its restart is measured: stop it (its run folder stays resumable)
            proc.kill()
            proc.wait()
            print(f"last attempt: first step {restart:.1f} s after launch (resumed: {bool(seen.get('resumed'))})")
            break
        delay = rng.uniform(*args.window)
        time.sleep(delay)
        if proc.poll() is not None:
            print(f"the run ended before kill {i + 1}; use a wider config or a shorter --window")
            break
        proc.send_signal(getattr(signal, f"SIG{args.signal}"))
        killed = time.time()
        code = proc.wait()
        stop = time.time() - killed
        saved = last.stat().st_mtime if last.is_file() else 0.0
        redone = max(0.0, min(killed, time.time()) - max(saved, seen["started"])) if args.signal == "KILL" else \
            max(0.0, last_step(out / "run") - saved)
        steps = steps_beyond(out / "run", last) if args.signal == "TERM" else None
        rows.append((i + 1, delay, redone, restart))
        extra = f"; {steps} steps redone, exit {code} {stop:.1f} s after the signal" if steps is not None else ""
        print(f"{args.signal.lower()} {i + 1}: {delay:.0f} s into the attempt; training redone {redone:.1f} s "
              f"({_when(killed - saved)}){extra}; this attempt reached its first step "
              f"{restart:.1f} s after launch",
              flush=True)
    if rows:
        mean = sum(r[2] for r in rows) / len(rows)
        print(f"\nmean training redone per failure: {mean:.1f} s over {len(rows)} kills "
              f"(max {max(r[2] for r in rows):.1f} s); cpu: {os.cpu_count()} cores; run folder {out / 'run'}")


def _when(before: float) -> str:
    return f"last save {before:.1f} s before the signal" if before >= 0 else f"saved {-before:.1f} s after the signal"


def _steps(run: Path) -> list[int]:
    rows = (run / "steps.csv").read_text().splitlines()[1:] if (run / "steps.csv").is_file() else []
    return [int(r.split(",")[0]) for r in rows if r]


def last_step(run: Path) -> float:
    """When the newest step in steps.csv was written (the file's time: it is appended every step)."""
    return (run / "steps.csv").stat().st_mtime if (run / "steps.csv").is_file() else 0.0


def steps_beyond(run: Path, last: Path) -> int:
    """Steps the stopped attempt finished after the step its newest checkpoint holds."""
    import torch

    saved = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    done = _steps(run)
    return (max(done) - saved) if done else 0


if __name__ == "__main__":
    main()
