"""Starting a process group (for the strategies in group.py): join the group a launcher set up (torchrun, or
Ray Train, which sets RANK / WORLD_SIZE), or start ``world`` processes here with ``torch.multiprocessing`` on
a free loopback port (forked from a server that imported trainrig once), restarted after a rank dies.
Callbacks travel to the ranks pickled; a callback with ``in_launcher = True`` stays in this process instead and
gets rank 0's events through a queue, one at a time (rank 0 waits for each to be handled, so files it names
are stable meanwhile).
"""
from __future__ import annotations

import contextlib
import gc
import os
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainrig.training.run import Callback, RunInfo
from trainrig.config import Config
from trainrig.errors import RunFailed, TrainrigError
from trainrig.training.preempt import Preempted, on_stop_signals, signal_name
from trainrig.parallel.rendezvous import agent_store_shared, fresh_store
from trainrig.parallel.base import DistEnv, Worker, group_timeout
from trainrig.training.watchdog import Watchdog


class WorkerFailed(RunFailed):
    """A DDP rank raised; the message names the rank and its error (the CLI exits 1, not 2)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(cfg: Config) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"


def _in_group(cfg: Config, env: DistEnv, worker: Worker, callbacks: Sequence[Callback], init: str) -> Any:
    """Join (or reuse, under Ray Train) the process group, run the worker, leave the group we made."""
    made = not dist.is_initialized()
    if made:
        timeout = group_timeout(cfg)
        if init == "env://" and agent_store_shared():  # torchrun: a store that outlives restarts (rendezvous.py)
            store = fresh_store(env.rank, env.world_size, cfg.dist_timeout_s)
            dist.init_process_group(backend_for(cfg), store=store, rank=env.rank, world_size=env.world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend_for(cfg), init_method=init, rank=env.rank, world_size=env.world_size,
                                    timeout=timeout)
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

    def on_test_end(self, run: Any, report: dict) -> None:
        self._send("on_test_end", run, report)

    def on_fit_end(self, run: Any) -> None:
        self._send("on_fit_end", run)


def _spawn_entry(local_rank: int, world: int, port: int, cfg: Config, worker: Worker,
                 callbacks: Sequence[Callback], results: Any, environ: dict[str, str]) -> None:
    os.environ.clear()  # the launcher's environment now, not the fork server's when it started
    os.environ.update(environ)
    env = DistEnv(rank=local_rank, world_size=world, local_rank=local_rank, local_world_size=world)
    for cb in callbacks:  # a stalled rank that must leave abruptly still reports its line to the launcher
        if isinstance(cb, Watchdog):
            cb.report = lambda message: results.put(("error", local_rank, message))
    try:
        result = _in_group(cfg, env, worker, callbacks, f"tcp://127.0.0.1:{port}")
        if env.is_main:
            results.put(("ok", local_rank, result))
    except Preempted as exc:  # saved and stopped as asked: not a failure
        results.put(("preempted", local_rank, exc))
    except BaseException as exc:  # report this rank's error in one line, then fail the process
        # bad input stays a TrainrigError (exit 2) in the parent; anything else becomes one line naming the rank
        report = exc if isinstance(exc, TrainrigError) else str(exc) if isinstance(exc, RunFailed) else \
            f"rank {local_rank} failed: {type(exc).__name__}: {exc}"
        results.put(("error", local_rank, report))
        if not isinstance(exc, (TrainrigError, RunFailed)):
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


# Ranks fork from a server that has imported trainrig, torch and what a rank imports later (torchvision's
# models and transforms, which ``import trainrig`` leaves out, the final test's metrics, the plots) once,
# instead of every rank importing them again as with "spawn": a tiny 2-rank run after the first takes 1.6 s
# instead of 9 s. Where there is no fork server (Windows), spawn.
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
PRELOAD = ["trainrig", "torchvision", "torchmetrics.classification", "matplotlib.pyplot"]


def _spawn(cfg: Config, worker: Worker, callbacks: Sequence[Callback], world: int) -> Any:
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    results, events, acks = ctx.SimpleQueue(), ctx.Queue(), ctx.Queue()
    local = [cb for cb in callbacks if cb.in_launcher]
    remote = [cb for cb in callbacks if not cb.in_launcher] + ([_Relay(events, acks)] if local else [])
    args = (world, free_port(), cfg, worker, remote, results, dict(os.environ))
    procs = mp.start_processes(_spawn_entry, args=args, nprocs=world, join=False, start_method=START_METHOD).processes
    failed = None
    try:
        with _forwarding(procs) as signalled:
            failed = _wait(procs, lambda: _pump(events, acks, local))
            _pump(events, acks, local)
    finally:  # a failed rank, or a launcher-side callback that raised (a stopped Tune trial): no rank stays
        _end(procs, after_failure=failed is not None)
    if failed is not None:
        raise _failure(failed, procs[failed].exitcode, _drain(results, "error"), signalled)
    ok, stopped = _drain(results, "ok", "preempted")
    if stopped:  # saved and stopped on a signal (rank 0's exception says where)
        raise stopped.get(0) or next(iter(stopped.values()))
    if 0 not in ok:
        raise WorkerFailed("ddp workers finished without a result from rank 0")
    return ok[0]


def _wait(procs: list, pump: Callable[[], None]) -> int | None:
    """Until every rank ended (None) or one failed (its index), handing launcher-side events on meanwhile."""
    while True:
        codes = [p.exitcode for p in procs]
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            return failed[0] if failed else None
        mp_connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.05)
        pump()


def _end(procs: list, after_failure: bool, grace_s: float = 3.0) -> None:
    """No rank outlives the launcher. After a failure the others usually fail soon on their own (their error
    lines say why); whoever is left after ``grace_s`` first writes its Python stacks to log.txt (SIGUSR2 to
    its faulthandler; a stopped process is continued for it), then is killed."""
    deadline = time.monotonic() + (grace_s if after_failure else 0.0)
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        mp_connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.1)
    left = [p for p in procs if p.is_alive()]
    for p in left if after_failure else ():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGUSR2)
            os.kill(p.pid, signal.SIGCONT)
    for p in left:
        p.join(timeout=0.05 if after_failure else 0.0)  # faulthandler writes as the signal arrives
        if p.is_alive():
            p.kill()
        p.join()


def _failure(index: int, code: int | None, errors: dict[int, Any], signalled: list[int]) -> Exception:
    """The exception for the launcher: the first error a rank reported (later ones are peers losing their
    connection to it), or how the rank died."""
    message = next(iter(errors.values()), None)
    if isinstance(message, TrainrigError):
        return message
    if message:
        return WorkerFailed(message)
    if code is not None and code < 0:
        name = signal_name(-code)
        if signalled and -code == signalled[0]:
            return Preempted(f"stopped by {name} before training began: nothing to save", -code)
        return WorkerFailed(f"rank {index} was killed ({name})")
    return WorkerFailed(f"rank {index} died (exit code {code})")


def _forwarding(procs: list) -> contextlib.AbstractContextManager[list[int]]:
    """SIGTERM / SIGUSR1 to the launcher go on to every rank (preempt.py); the list yielded records them."""
    def forward(signum: int) -> None:
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)
    return on_stop_signals(forward)


def _drain(results: Any, *wanted: str) -> Any:
    """The ranks' reports of each wanted kind, rank -> payload (the first of each rank, in arrival order)."""
    found: dict[str, dict[int, Any]] = {kind: {} for kind in wanted}
    while not results.empty():
        status, rank, payload = results.get()
        if status in found:
            found[status].setdefault(rank, payload)
    return found[wanted[0]] if len(wanted) == 1 else [found[kind] for kind in wanted]


def join_group(cfg: Config, env: DistEnv, worker: Worker, callbacks: Sequence[Callback]) -> Any:
    """torchrun (or Ray Train) set up the rendezvous: join it and run the worker."""
    return _in_group(cfg, env, worker, callbacks, "env://")


def spawn_group(cfg: Config, world: int, worker: Worker, callbacks: Sequence[Callback],
                again: Worker | None = None) -> Any:
    """``world`` processes started here; with ``restarts: N``, after a rank dies (not bad input) the group is
    started again up to N times, running ``again`` (the worker resuming from the newest checkpoint)."""
    for attempt in range(cfg.restarts + 1):
        try:
            return _spawn(cfg, worker if attempt == 0 or again is None else again, callbacks, world)
        except WorkerFailed as exc:
            if attempt == cfg.restarts:
                raise
            print(f"trainrig: {exc}; restarting the group from the newest checkpoint "
                  f"(restart {attempt + 1} of {cfg.restarts})", file=sys.stderr, flush=True)


__all__ = ["join_group", "spawn_group", "WorkerFailed", "free_port"]
