"""What this process may use of the machine."""
from __future__ import annotations

import os

import torch


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's or Slurm's cpuset), not the
    machine's count, which would give a process confined to fewer cores more threads than it has cores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


# precision -> (oneDNN's check that this CPU computes the type with its own instructions, what they are)
_CPU_NATIVE = {"bf16-mixed": ("_is_mkldnn_bf16_supported", "AVX512 or AMX"),
               "16-mixed": ("_is_mkldnn_fp16_supported", "AVX512-FP16 or AMX-FP16")}


def cpu_precision_warning(precision: str, device_type: str) -> str | None:
    """A warning when autocast on this CPU would emulate ``precision``'s type: measured 11x (bf16) and 16x
    (fp16) slower than float32 on an AVX2 EPYC, which makes a run sized for an hour look hung; None when the
    CPU computes the type natively (or the device is not a CPU)."""
    check, needs = _CPU_NATIVE.get(precision, (None, ""))
    if device_type != "cpu" or check is None or getattr(torch.ops.mkldnn, check)():
        return None
    return (f"warning: precision {precision} on a CPU without {needs} ({torch.backends.cpu.get_cpu_capability()}): "
            f"autocast emulates it, 10x or more slower than precision 32; set precision: 32 (--set precision=32)")
