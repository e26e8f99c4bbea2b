"""Launching: run a worker once per process the strategy needs, and return rank 0's result.

single / dp / model_parallel: in this process. ddp: in the group a launcher set up (torchrun, or Ray Train,
which sets RANK / WORLD_SIZE), or in ``world`` processes started here with ``torch.multiprocessing`` on a
free loopback port. Callbacks travel to spawned ranks pickled; a callback with ``in_launcher = True``
stays in this process instead and gets rank 0's events through a queue, one at a time (rank 0 waits
for each to be handled, so files it names are stable meanwhile).
"""
from __future__ import annotations

import datetime
import gc
import queue as queue_mod
import socket
import sys
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from .callbacks import Callback, RunInfo
from .config import Config
from .errors import ConfigError, TrainrigError
from .strategy import DistEnv

Worker = Callable[[DistEnv, Sequence[Callback]], Any]


class WorkerFailed(Exception):
    """A DDP rank raised; the message names the rank and its error (the CLI exits 1, not 2)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_world_size(cfg: Config) -> int:
    """Processes to start for ddp: ``devices: N``, a list's length, or auto (each GPU, else 2 CPU processes)."""
    if isinstance(cfg.devices, int):
        return cfg.devices
    if isinstance(cfg.devices, list):
        return len(cfg.devices)
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def backend_for(cfg: Config) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"


def _in_group(cfg: Config, env: DistEnv, worker: Worker, callbacks: Sequence[Callback], init: str) -> Any:
    """Join (or reuse, under Ray Train) the process group, run the worker, leave the group we made."""
    made = not dist.is_initialized()
    if made:
        dist.init_process_group(backend_for(cfg), init_method=init, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    try:
        return worker(env, callbacks)
    finally:
        if made:
            gc.collect()  # the worker's DDP reducer (and its comm hook) goes before the group it uses
            dist.destroy_process_group()


class _Relay(Callback):
    """Rank 0's stand-in for the launcher-side callbacks: sends each event and waits until it is handled."""

    def __init__(self, events: Any, acks: Any):
        self.events, self.acks = events, acks

    def _send(self, hook: str, run: Any, *args: Any) -> None:
        self.events.put((hook, RunInfo(run.cfg, run.run_dir), args))
        self.acks.get()

    def on_fit_start(self, run: Any) -> None:
        self._send("on_fit_start", run)

    def on_epoch_end(self, run: Any, row: dict) -> None:
        self._send("on_epoch_end", run, row)

    def on_fit_end(self, run: Any) -> None:
        self._send("on_fit_end", run)


def _spawn_entry(local_rank: int, world: int, port: int, cfg: Config, worker: Worker,
                 callbacks: Sequence[Callback], results: Any) -> None:
    env = DistEnv(rank=local_rank, world_size=world, local_rank=local_rank, local_world_size=world)
    try:
        result = _in_group(cfg, env, worker, callbacks, f"tcp://127.0.0.1:{port}")
        if env.is_main:
            results.put(("ok", local_rank, result))
    except BaseException as exc:  # report this rank's error in one line, then fail the process
        # bad input stays a TrainrigError (exit 2) in the parent; anything else becomes one line naming the rank
        report = exc if isinstance(exc, TrainrigError) else f"rank {local_rank} failed: {type(exc).__name__}: {exc}"
        results.put(("error", local_rank, report))
        if not isinstance(exc, TrainrigError):
            traceback.print_exc()
        raise


def _pump(events: Any, acks: Any, local: Sequence[Callback]) -> None:
    """Hand queued rank-0 events to the launcher-side callbacks, acknowledging each."""
    while True:
        try:
            hook, info, args = events.get(timeout=0.2)
        except queue_mod.Empty:
            return
        try:
            for cb in local:
                getattr(cb, hook)(info, *args)
        finally:
            acks.put(True)


def _spawn(cfg: Config, worker: Worker, callbacks: Sequence[Callback], world: int) -> Any:
    ctx = mp.get_context("spawn")
    results, events, acks = ctx.SimpleQueue(), ctx.Queue(), ctx.Queue()
    local = [cb for cb in callbacks if cb.in_launcher]
    remote = [cb for cb in callbacks if not cb.in_launcher] + ([_Relay(events, acks)] if local else [])
    procs = mp.start_processes(_spawn_entry, args=(world, free_port(), cfg, worker, remote, results),
                               nprocs=world, join=False, start_method="spawn")
    try:
        while not procs.join(timeout=0.05):
            _pump(events, acks, local)
        _pump(events, acks, local)
    except ProcessException as exc:  # start_processes already ended the other ranks
        errors = _drain(results, "error")  # in the order they happened: the first is the cause, later ones
        message = next(iter(errors.values()), None)  # are peers losing their connection to it
        if isinstance(message, TrainrigError):
            raise message from None
        killed = getattr(exc, "signal_name", None)  # a rank killed by a signal reports nothing itself
        raise WorkerFailed(f"rank {exc.error_index} was killed ({killed})" if killed else
                           message or f"rank {exc.error_index} died ({exc})") from None
    finally:  # a launcher-side callback that raised (a stopped Tune trial) must not leave ranks behind
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    ok = _drain(results, "ok")
    if 0 not in ok:
        raise WorkerFailed("ddp workers finished without a result from rank 0")
    return ok[0]


def _drain(results: Any, wanted: str) -> dict[int, Any]:
    found: dict[int, Any] = {}
    while not results.empty():
        status, rank, payload = results.get()
        if status == wanted:
            found.setdefault(rank, payload)
    return found


def launch(cfg: Config, worker: Worker, callbacks: Sequence[Callback], again: Worker | None = None) -> Any:
    """Run ``worker(env, callbacks)`` as the strategy says and return rank 0's result. Spawned ddp with
    ``restarts: N``: after a rank dies (not bad input), the group is started again up to N times, running
    ``again`` (the worker resuming from the newest checkpoint)."""
    if cfg.strategy != "ddp":
        return worker(DistEnv(), callbacks)
    env = DistEnv.from_environ()
    if env.launched:  # torchrun (or Ray Train) set up the rendezvous; join it
        return _in_group(cfg, env, worker, callbacks, "env://")
    world = ddp_world_size(cfg)
    if world < 1:
        raise ConfigError(f"devices: ddp needs at least one process, got {cfg.devices!r}")
    for attempt in range(cfg.restarts + 1):
        try:
            return _spawn(cfg, worker if attempt == 0 or again is None else again, callbacks, world)
        except WorkerFailed as exc:
            if attempt == cfg.restarts:
                raise
            print(f"trainrig: {exc}; restarting the group from the newest checkpoint "
                  f"(restart {attempt + 1} of {cfg.restarts})", file=sys.stderr, flush=True)


__all__ = ["launch", "WorkerFailed", "ddp_world_size", "free_port"]
