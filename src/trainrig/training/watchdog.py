"""The watchdog: a process that makes no progress for ``dist_timeout_s`` ends the run, saying where.

Progress is a training step, an evaluation batch or an epoch boundary. A thread in every process checks
it every few seconds; under ddp it also publishes a heartbeat through the group's store (its own
connection, short timeouts): the time it last answered, its step and where its main thread is, so the rank
that notices a stall can name the one that caused it (a peer stopped by the scheduler stops answering; a
peer stuck in its data loader answers but is not in a collective). On a stall it writes the line and every
thread's Python stack (faulthandler) to the run's log.txt, asks its peers to write theirs, then raises
``Stalled`` in the main thread; if the main thread is stuck in C and cannot take it, the process leaves
with exit code 1 after a few seconds. A C-level backstop (faulthandler.dump_traceback_later) dumps and ends
the process even if the thread itself cannot run (the GIL held forever).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from trainrig.training.callbacks import Callback
from trainrig.errors import RunFailed

COLLECTIVES = {"all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "broadcast_object_list",
               "reduce_scatter", "gather", "scatter", "send", "recv", "wait", "all_to_all"}
GRACE_S = 8.0  # after raising Stalled in the main thread, how long until the process is ended instead (a data
# loader's main thread looks up from its queue every 5 s)
BACKSTOP_S = 20.0  # the C-level dump-and-exit comes this long after the watchdog's own limit
SUSPENDED_S = 5.0  # a gap this much longer than the check interval means the process itself was stopped


class Stalled(RunFailed):
    """No progress for dist_timeout_s; the message names the rank, where it was and its step."""


def where(frame: Any, distributed: bool) -> str:
    """What the main thread is doing, from its innermost interesting frame."""
    inner = None
    while frame is not None:
        path, name = frame.f_code.co_filename.replace("\\", "/"), frame.f_code.co_name
        if path.endswith("distributed_c10d.py") and name in COLLECTIVES:
            return name
        if "/torch/utils/data/" in path:
            return "the data loader"
        if path.endswith("autograd/graph.py") or path.endswith("autograd/__init__.py"):
            return "backward (the gradient all-reduce)" if distributed else "backward"
        if "/trainrig/" in path and inner is None and not path.endswith("watchdog.py"):
            inner = f"{name} ({os.path.basename(path)}:{frame.f_lineno})"
        frame = frame.f_back
    return inner or "unknown"


def waiting(place: str) -> bool:
    return place in COLLECTIVES or place.startswith("backward (")


class Watchdog(Callback):
    """Armed from the first epoch to the end of fit, on every rank (see the module doc)."""

    rank_zero_only = False

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.report: Callable[[str], None] | None = None  # set by a launcher that reports ranks' errors itself
        self._reset()

    def _reset(self) -> None:
        self.last, self.step, self.thread, self.log, self.store = time.monotonic(), 0, None, None, None
        self.fired = self.dumped = False
        self.stop = threading.Event()

    def __getstate__(self) -> dict:  # travels to spawned ranks before it is armed
        return {"timeout_s": self.timeout_s, "report": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # progress ------------------------------------------------------------------------------------------
    def beat(self, step: int | None = None) -> None:
        self.last = time.monotonic()
        if step is not None:
            self.step = step

    def on_epoch_start(self, run: Any, epoch: int, batches: int) -> None:
        if self.thread is None:
            self._arm(run)
        self.beat(run.state.global_step)

    def on_train_batch_end(self, run: Any, step: int, loss: Any) -> None:
        self.last, self.step = time.monotonic(), run.state.global_step

    def on_evaluate_batch_end(self, run: Any, batch: int) -> None:
        self.last = time.monotonic()

    def on_evaluate_start(self, run: Any) -> None:
        self.beat()

    def on_epoch_end(self, run: Any, row: dict) -> None:
        self.beat()

    def on_fit_end(self, run: Any) -> None:
        self._disarm()

    def on_exception(self, run: Any, exc: BaseException) -> None:
        if self.fired:  # a stopped data loader worker: continue it, so that the loader's
            _signal_children(signal.SIGCONT)  # own shutdown ends it (a kill would raise in this thread)
        self._disarm()

    # the thread ----------------------------------------------------------------------------------------
    def _arm(self, run: Any) -> None:
        self.rank, self.world = run.strategy.env.rank, run.strategy.env.world_size
        self.log = open(run.run_dir / "log.txt", "a")
        self.store = _own_store() if self.world > 1 else None
        self.main = threading.get_ident()  # the thread that trains (not the main one under Ray Train / Tune)
        self.interval = max(0.2, min(2.0, self.timeout_s / 10))
        faulthandler.register(_DUMP_SIGNAL, file=self.log, all_threads=True, chain=False)
        self.thread = threading.Thread(target=self._watch, name="trainrig-watchdog", daemon=True)
        self.thread.start()

    def _disarm(self) -> None:
        if self.thread is None:
            return
        self.stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        faulthandler.cancel_dump_traceback_later()
        faulthandler.unregister(_DUMP_SIGNAL)
        self.log.close()
        self._reset()

    def _watch(self) -> None:
        seen, woke = None, time.monotonic()
        while not self.stop.wait(self.interval):
            if time.monotonic() - woke > self.interval + SUSPENDED_S:  # this whole process was stopped (a
                self.last = woke = time.monotonic()  # suspended job, SIGSTOP): no stall of its own; look
                continue  # again before talking to peers, which may be gone meanwhile
            woke = time.monotonic()
            if seen != self.last:  # progress since the last look: move the C-level backstop on
                seen = self.last
                faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, file=self.log, exit=True)
            place = where(sys._current_frames().get(self.main), self.world > 1)
            self._publish(place)
            idle = time.monotonic() - self.last
            if idle >= self.timeout_s:
                return self._fire(idle, place)

    def _publish(self, place: str) -> None:
        """Heartbeat: wall time now, seconds since progress, step, where; and answer a peer's dump request."""
        if self.store is None:
            return
        try:
            idle = time.monotonic() - self.last
            self.store.set(f"watchdog/{self.rank}", f"{time.time():.1f}|{idle:.1f}|{self.step}|{place}")
            if not self.dumped and self.store.check(["watchdog/dump"]):
                self.dumped = True
                self._dump(f"rank {self.rank}: stacks on request of {self.store.get('watchdog/dump').decode()}")
        except Exception:  # a peer's stopped store: the rank that fires reports it
            pass

    def _fire(self, idle: float, place: str) -> None:
        message = self._blame(idle, place)
        self._dump(f"watchdog: {message}")
        if self.store is not None:
            try:
                self.store.set("watchdog/dump", f"rank {self.rank}")
            except Exception:
                pass
        self.fired = True
        _async_raise(self.main, message)
        # the main thread takes it when it next runs Python; inside a collective it would not before the
        # collective's own timeout, so then the process leaves at once
        if not waiting(place) and self.stop.wait(GRACE_S):  # taken: the run is ending (on_exception)
            return
        _signal_children(signal.SIGKILL)  # data loader workers: a stopped one would outlive us
        (self.report or _print)(message)
        self.log.flush()
        os._exit(1)

    def _dump(self, header: str) -> None:
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {header}; stacks of pid {os.getpid()}:\n")
        self.log.flush()
        faulthandler.dump_traceback(file=self.log, all_threads=True)
        self.log.flush()

    def _blame(self, idle: float, place: str) -> str:
        """The one line: the rank that stopped the group (a peer that stopped answering, or one busy outside
        a collective), else this one."""
        who = f"rank {self.rank}" if self.world > 1 else "the run"
        me = f"{who} made no progress for {idle:.0f} s (in {place}, step {self.step})"
        if self.store is None:
            return me
        now, quiet, busy = time.time(), [], []
        for rank in (r for r in range(self.world) if r != self.rank):
            key = f"watchdog/{rank}"
            try:
                if not self.store.check([key]):
                    quiet.append(f"rank {rank} sent no heartbeat since the first epoch began (stopped or stuck)")
                    continue
                wall, peer_idle, step, peer_place = self.store.get(key).decode().split("|", 3)
            except Exception:
                quiet.append(f"rank {rank} does not answer: the group's store did not (a stopped process holds it)")
                continue
            if now - float(wall) > 3 * self.interval + 2:
                quiet.append(f"rank {rank} stopped answering {now - float(wall):.0f} s ago (last seen in "
                             f"{peer_place}, step {step})")
            elif not waiting(peer_place):
                busy.append(f"rank {rank} made no progress for {float(peer_idle):.0f} s (in {peer_place}, "
                            f"step {step})")
        blamed = quiet or busy
        return f"{blamed[0]}; rank {self.rank} waited {idle:.0f} s in {place}" if blamed else me


_DUMP_SIGNAL = signal.SIGUSR2


def _own_store() -> Any:
    """A connection of our own to the group's store, with short timeouts (the main thread's may be busy)."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store().clone()
        store.set_timeout(datetime.timedelta(seconds=3))
        return store
    except Exception:  # a store that cannot be cloned: the watchdog still watches this rank
        return None


def _async_raise(thread_id: int | None, message: str) -> None:
    """Raise Stalled(message) in the thread ``thread_id`` when it next runs Python code (CPython takes an
    exception class here, so the message travels in a subclass)."""
    if thread_id is not None:
        cls = type("Stalled", (Stalled,), {"__init__": lambda self: Stalled.__init__(self, message),
                                           "__reduce__": lambda self: (Stalled, (message,))})
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(cls))


def _signal_children(sig: int) -> None:
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError):
            os.kill(child.pid, sig)


def _print(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
