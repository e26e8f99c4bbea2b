"""Preemption: SIGTERM or SIGUSR1 (Slurm's --signal, Kubernetes eviction, spot reclaim) ends a run at the next
step with a checkpoint, so a resumed run (``--resume auto``) loses no work.

A signal may reach any one rank (or the launcher, which forwards it to its ranks; the Ray driver leaves a
``STOP`` file in the run folder instead, which rank 0 reads about once a second, as anyone may). Every rank
offers its request each step as a small asynchronous MAX over the ranks (``strategy.any_rank``, a CPU gloo
group, read one step later so nobody waits for it); all ranks thus learn of it at the same step, save the
same mid-epoch checkpoint there and raise ``Preempted``. The process then exits with 128 + the signal
number (143 for SIGTERM, 138 for SIGUSR1), as if the signal had ended it, after the save.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
STOP_FILE = "STOP"  # a request file in the run folder: its text names the signal (empty = SIGTERM)


class Preempted(Exception):
    """The run stopped on a signal after saving; ``signum`` gives the exit code 128 + signum. ``message``
    (rank 0's: what was saved and how to continue) is empty on other ranks."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, signum)
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def on_stop_signals(action: Callable[[int], None]) -> Iterator[list[int]]:
    """While inside, SIGTERM / SIGUSR1 call ``action(signum)`` instead of ending the process (a launcher or
    driver passes them on); yields the list of signals received. Only the main thread may set handlers:
    elsewhere nothing is installed."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handle(signum: int, frame: Any) -> None:
        got.append(signum)
        action(signum)
    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_message(signum: int, epochs_done: int, batch: int, global_step: int, last: Path) -> str:
    """What a stopped run prints: where it stopped, what it saved and how to go on."""
    where = f"epoch {epochs_done + 1} step {global_step}" if batch else f"the end of epoch {epochs_done}"
    return (f"stopped by {signal_name(signum)} at {where}: saved {last}; continue with the same command and "
            f"--resume auto")


def stop_file_signal(run_dir: Path) -> int:
    """The signal a STOP file in ``run_dir`` asks for (0: no file)."""
    path = run_dir / STOP_FILE
    if not path.is_file():
        return 0
    try:
        text = path.read_text().strip().upper()
    except OSError:
        text = ""
    name = text if text.startswith("SIG") else f"SIG{text}" if text else "SIGTERM"
    return int(getattr(signal, name, signal.SIGTERM))


class StopRequest:
    """This process's stop request (from a signal handler or the STOP file) and the ranks' agreement."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}
        self.pending: Callable[[], int] | None = None
        self.checked = 0.0

    def install(self) -> None:
        """Catch SIGTERM / SIGUSR1 while the run trains (only the main thread may; elsewhere - a Ray Train
        worker's thread - the STOP file is the way in)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def local(self, run: Any) -> int:
        """This rank's request: a signal it got, or (rank 0, at most once a second) the STOP file."""
        if not self.signum and run.strategy.is_main and time.monotonic() - self.checked >= 1.0:
            self.checked = time.monotonic()
            self.signum = stop_file_signal(run.run_dir)
        return self.signum

    def poll(self, run: Any) -> int:
        """Called by every rank at every step boundary: the signal all ranks agreed to stop on, or 0. The
        agreement started one call earlier is read, and the next one started."""
        if run.strategy.env.world_size == 1:
            return self.local(run)
        agreed = self.pending() if self.pending is not None else 0
        self.pending = run.strategy.any_rank(self.local(run))
        return agreed

    def clear_file(self, run_dir: Path) -> None:
        """A resumed run starts without the request that stopped the previous one."""
        (run_dir / STOP_FILE).unlink(missing_ok=True)
