"""Does a torchrun group come back after a rank dies? No trainrig in the training script.

    python benchmarks/torchrun_restart.py --runs 10

Each run: ``torchrun --standalone --nproc-per-node 2 --max-restarts 1`` of a plain script (gloo, a DDP
Linear; rank 1 SIGKILLs itself at step 3 of the first attempt), joining the group three ways:
  plain       init_process_group("gloo") from torchrun's environment (env://);
  no-share    the same, with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment;
  fresh       init_process_group(store=trainrig.parallel.rendezvous.fresh_store(...)), what trainrig does.
Prints how many runs finished and how long the slowest took (docs/failures.md quotes it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(marker: str, how: str) -> None:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=30)
    if how == "fresh":
        from trainrig.parallel.rendezvous import fresh_store

        dist.init_process_group("gloo", store=fresh_store(rank, world, 30), rank=rank, world_size=world,
                                timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 7):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        if rank == 1 and step == 3 and not os.path.exists(marker):
            Path(marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
    dist.destroy_process_group()


def one_run(how: str, folder: Path, i: int, logs: Path | None = None) -> tuple[bool, float]:
    marker = folder / f"{how}-{i}.killed"
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1" if how == "no-share" else "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", __file__, "--worker", str(marker), how]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        ok, output = proc.returncode == 0 and marker.exists(), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        ok, output = False, str(exc.stdout or "") + str(exc.stderr or "")
    if logs is not None and not ok:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{how}-{i}.log").write_text(output)
    return ok, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ways", nargs="+", default=["plain", "no-share", "fresh"])
    parser.add_argument("--logs", type=Path, help="Keep the output of failed runs in this folder.")
    parser.add_argument("--worker", nargs=2)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch

    print(f"torch {torch.__version__}, {args.runs} runs each, torchrun --standalone --max-restarts 1")
    with tempfile.TemporaryDirectory() as tmp:
        for how in args.ways:
            results = [one_run(how, Path(tmp), i, args.logs) for i in range(args.runs)]
            passed = sum(ok for ok, _ in results)
            print(f"{how:9s} {passed}/{args.runs} came back; slowest run {max(s for _, s in results):.0f} s; "
                  f"failed runs took {[round(s) for ok, s in results if not ok]} s", flush=True)


if __name__ == "__main__":
    main()
