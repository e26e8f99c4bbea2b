"""One run folder, one run: the process that trains into a run folder holds ``<run>/.lock``.

The lock is an ``flock`` on that file, so the kernel drops it when its holder dies however it dies (kill -9,
a lost node); the file's text (PID, host, start time, command) names the holder for the error a second start
gets. A holder that ended normally empties the file; text left in a file whose lock is free was left by a
process that died: the next start takes the folder over and says so.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from trainrig.errors import TrainrigError

NAME = ".lock"


class RunInUse(TrainrigError):
    """Another live process trains into this run folder."""


class RunLock:
    """Held from the moment a run folder is chosen until the run ends (``release``)."""

    def __init__(self, run_dir: Path, fd: int, note: str = ""):
        self.run_dir, self.fd, self.note = run_dir, fd, note

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Take the folder's lock or raise RunInUse naming the holder; ``note``: a warning when a dead
        holder's lock was taken over."""
        fd = _locked(run_dir / NAME)
        left = _read(fd)
        note = f"warning: took over {run_dir} from {_describe(left)}, which ended without releasing it" \
            if left else ""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(run_dir, fd, note)

    def release(self) -> None:
        """Empty the lock file and drop the lock; a folder the run left empty is left empty again (the next
        fresh run of that name takes it)."""
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
            if [p.name for p in self.run_dir.iterdir()] == [NAME]:
                (self.run_dir / NAME).unlink()
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _locked(path: Path) -> int:
    """An open descriptor of ``path`` holding its flock (RunInUse naming the holder when another has it). A
    file unlinked by its releasing holder between our open and our lock is opened again."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunInUse(f"{path.parent}: cannot write the run folder's lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _describe(_read(fd))
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise RunInUse(f"{path.parent}: in use by {holder}; wait for that run to end (or stop it), or "
                               f"give another name") from None
            raise RunInUse(f"{path.parent}: cannot lock the run folder ({exc.strerror or exc})") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _command() -> str:
    """This process's command line, short: ``trainer fit -c run.yaml ...``."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    program = "python -m trainrig" if program == "__main__.py" else program
    text = " ".join([program, *sys.argv[1:]])
    return text if len(text) <= 120 else text[:119] + "…"


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        found = json.loads(text) if text else {}
        return found if isinstance(found, dict) else {"text": text[:80]}
    except ValueError:
        return {"text": "unreadable lock text"}


def _describe(info: dict) -> str:
    if "pid" not in info:
        return "another process"
    command = f" ({info['command']})" if info.get("command") else ""
    return f"PID {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}{command}"
