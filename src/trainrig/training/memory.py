"""Memory: the only module that knows about CUDA memory and out-of-memory errors.

``gpu_usage()`` gives the source notes' GPUtil table as rows (plus torch's per-device figures),
``free_memory()`` does what people do by hand after an OOM (gc, ``empty_cache``, reset the peak),
``memory_report()`` measures a block, and ``is_oom()`` recognises an OOM by type before text.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

MiB = 2 ** 20


def is_oom(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError (by type) and the CPU allocator's "can't allocate memory"."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return "CUDA out of memory" in text or "can't allocate memory" in text or "DefaultCPUAllocator" in text
    return False


def free_memory() -> None:
    """Drop unreachable tensors, hand cached CUDA blocks back to the driver and reset the peak counters."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


@dataclass(frozen=True)
class DeviceMemory:
    """One CUDA device: this process's allocator figures and the device's total / free, in MiB."""

    index: int
    name: str
    allocated: float
    reserved: float
    peak: float
    total: float
    free: float
    util_percent: float | None = None   # from GPUtil / nvidia-smi, when available
    memory_percent: float | None = None


def _gputil_rows() -> dict[int, tuple[float, float]]:
    """GPU util % and memory % per device id via GPUtil (nvidia-smi); empty without either."""
    try:
        import GPUtil

        return {g.id: (100 * g.load, 100 * g.memoryUtil) for g in GPUtil.getGPUs()}
    except Exception:  # no GPUtil, no nvidia-smi, or it failed: the torch figures still stand
        return {}


def gpu_usage() -> list[DeviceMemory]:
    """Rows for every visible CUDA device (empty list without CUDA)."""
    if not torch.cuda.is_available():
        return []
    smi = _gputil_rows()
    rows = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        util, mem = smi.get(i, (None, None))
        rows.append(DeviceMemory(i, torch.cuda.get_device_name(i), torch.cuda.memory_allocated(i) / MiB,
                                 torch.cuda.memory_reserved(i) / MiB, torch.cuda.max_memory_allocated(i) / MiB,
                                 total / MiB, free / MiB, util, mem))
    return rows


def host_memory() -> dict[str, float]:
    """Host RAM in MiB: total and available (from /proc/meminfo), and this process's resident size."""
    info: dict[str, float] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(value.split()[0]) / 1024
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    info["ProcessRSS"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"total": info.get("MemTotal", float("nan")), "available": info.get("MemAvailable", float("nan")),
            "process_rss": info.get("ProcessRSS", float("nan"))}


@dataclass
class MemoryReport:
    """Allocated / reserved / peak MiB per CUDA device before and after a block (filled on exit)."""

    before: dict[int, tuple[float, float]] = field(default_factory=dict)
    after: dict[int, tuple[float, float]] = field(default_factory=dict)
    peak: dict[int, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"cuda:{i}: allocated {self.before[i][0]:.0f} -> {self.after[i][0]:.0f} MiB, reserved "
                f"{self.before[i][1]:.0f} -> {self.after[i][1]:.0f} MiB, peak {self.peak[i]:.0f} MiB"
                for i in self.after]


def _snapshot() -> dict[int, tuple[float, float]]:
    if not torch.cuda.is_available():
        return {}
    return {i: (torch.cuda.memory_allocated(i) / MiB, torch.cuda.memory_reserved(i) / MiB)
            for i in range(torch.cuda.device_count())}


@contextlib.contextmanager
def memory_report() -> Iterator[MemoryReport]:
    """``with memory_report() as r: ...`` then ``r.lines()``; empty on a machine without CUDA."""
    report = MemoryReport(before=_snapshot())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    try:
        yield report
    finally:
        report.after = _snapshot()
        report.peak = {i: torch.cuda.max_memory_allocated(i) / MiB for i in report.after}


# ----------------------------------------------------------------------------- after an OOM

def memory_figures() -> str:
    """One line of the figures that matter after an OOM: per-GPU free/total and peak, or host RAM."""
    rows = gpu_usage()
    if rows:
        return "; ".join(f"cuda:{r.index} free {r.free:.0f}/{r.total:.0f} MiB, peak {r.peak:.0f} MiB" for r in rows)
    host = host_memory()
    return f"host RAM available {host['available']:.0f}/{host['total']:.0f} MiB, process {host['process_rss']:.0f} MiB"


def find_batch_size(try_step, start: int = 2, limit: int = 4096, margin: float = 0.1, log=print) -> int:
    """Largest batch for which ``try_step(batch)`` (a real forward+backward+step) runs, less ``margin``.

    Doubles from ``start`` until an OOM or ``limit``, then binary-searches between the last size that ran
    and the first that failed. Memory is freed after every try.
    """
    def fits(size: int) -> bool:
        try:
            try_step(size)
            return True
        except Exception as exc:
            if not is_oom(exc):
                raise
            return False
        finally:
            free_memory()

    lo, hi = 0, None
    size = max(1, start)
    while size <= limit:
        if not fits(size):
            hi = size
            break
        lo, size = size, size * 2
    if lo == 0:
        from trainrig.errors import OutOfMemory

        raise OutOfMemory(f"batch_size auto: even batch {start} runs out of memory; {memory_figures()}")
    if hi is None:
        hi = min(size, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    chosen = max(1, int(lo * (1 - margin)))
    log(f"batch_size auto: largest batch that ran {lo}, using {chosen} ({margin:.0%} margin)")
    return chosen


_CUDA_HINTS = {
    "CUDNN_STATUS_NOT_INITIALIZED": "cuDNN could not start: usually the GPU is already out of memory when cuDNN "
                                    "allocates its workspace, or torch's CUDA build does not match the driver; try a "
                                    "smaller data.batch_size or batch_size: auto, and check `trainer gpus`",
    "device-side assert triggered": "a CUDA kernel assertion failed, most often a label outside "
                                    "[0, model.num_classes) or an index out of range; rerun with "
                                    "CUDA_LAUNCH_BLOCKING=1 (or on CPU) to see the failing operation",
}


@contextlib.contextmanager
def explain_cuda_errors() -> Iterator[None]:
    """Re-raise known opaque CUDA failures as one line that says what usually causes them."""
    try:
        yield
    except RuntimeError as exc:
        if is_oom(exc):
            raise
        for needle, hint in _CUDA_HINTS.items():
            if needle in str(exc):
                from trainrig.errors import CudaFailure

                raise CudaFailure(f"{needle}: {hint}") from exc
        raise
