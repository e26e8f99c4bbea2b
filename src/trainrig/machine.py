"""What this process may use of the machine."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's or Slurm's cpuset), not the
    machine's count, which would give a process confined to fewer cores more threads than it has cores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1
