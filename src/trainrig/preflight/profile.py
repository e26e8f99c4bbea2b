"""``trainer profile`` / ``trainrig.profile``: where a training step's time goes, on the user's own config.

The run is built as ``fit`` builds it (probe.py), then ``warmup`` steps (the first compiles, autotunes, fills
caches) and ``steps`` steps under ``torch.profiler``, each step's batch fetch inside a ``data`` range. Out:
``trace.json`` (Perfetto / chrome://tracing; one ``ProfilerStep#N`` per step), the top operators by self time,
the share of each step spent waiting for its batch, images/s, the FLOPs a step does (FlopCounterMode over one
step: forward and backward) and so the FLOP/s achieved - and model FLOPs utilisation where the device's peak
is known (or given). The weights are put back afterwards; the folder keeps the files.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainrig.data.batches import LoaderBatches
from trainrig.errors import ConfigError
from trainrig.config import Config
from trainrig.machine import cpu_precision_warning
from trainrig.parallel import DistEnv
from trainrig.preflight.probe import batches, probe
from trainrig.training.checkpoint import atomic_write_text
from trainrig.training.run import Run
from trainrig.training.setup import UserParts

# Dense peak FLOP/s of known accelerators by name fragment: (16-bit tensor cores, float32). Matched in order.
PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12), "V100": (125e12, 15.7e12), "T4": (65e12, 8.1e12),
}
DATA_WAIT_ADVICE = 0.10  # above this share of a step, the data path is the bottleneck


@dataclass(frozen=True)
class ProfileResult:
    run_dir: Path
    trace: Path  # trace.json
    table: str  # the top operators by self time (torch.profiler's key_averages table)
    steps: int
    step_s: float  # mean seconds per profiled step
    data_wait: float  # share of a step spent waiting for its batch, in [0, 1]
    images_per_s: float
    flops_per_step: int  # FlopCounterMode over one training step, this process
    achieved: float  # FLOP/s over the profiled steps
    peak: float | None  # the device's peak FLOP/s for this precision, when known
    advice: str | None  # lines: a precision this CPU emulates, a data wait over 10%

    @property
    def mfu(self) -> float | None:
        return self.achieved / self.peak if self.peak else None


def profile(cfg: Config, *, steps: int = 10, warmup: int = 3, peak_flops: float | None = None,
            model: nn.Module | None = None, train_data: Any = None, test_data: Any = None) -> ProfileResult | None:
    """Profile ``steps`` training steps of ``cfg`` after ``warmup``; rank 0's result. ``peak_flops``: the
    device's peak FLOP/s, when the table (PEAKS) does not know it (CPUs: no table)."""
    if steps < 1 or warmup < 2:
        raise ConfigError(f"profile: need steps >= 1 and warmup >= 2, got steps={steps}, warmup={warmup}")
    return probe(cfg, "profile", UserParts(model, train_data, test_data),
                 functools.partial(_profile, steps, warmup, peak_flops))


def _profile(steps: int, warmup: int, peak_flops: float | None, run: Run, env: DistEnv) -> ProfileResult | None:
    trace, tables = run.run_dir / "trace.json", []
    sort = "self_cuda_time_total" if run.strategy.device.type == "cuda" else "self_cpu_time_total"

    def ready(prof: Any) -> None:  # the profiler's cycle ended: its events go now, or never
        tables.append(prof.key_averages().table(sort_by=sort, row_limit=15))
        if env.is_main:
            prof.export_chrome_trace(str(trace))
    feed = batches(run)
    for _ in range(warmup - 2):
        run.stepper.step(*next(feed))
    with FlopCounterMode(display=False) as counter:  # a warm-up step, counted
        run.stepper.step(*next(feed))
    fetch, total, seen = _steps(run, feed, steps, ready)
    if not env.is_main:
        return None
    flops = counter.get_total_flops()
    result = ProfileResult(run.run_dir, trace, tables[0], steps, total / steps, min(max(fetch / total, 0.0), 1.0),
                           seen / total, flops, flops * steps / total, peak_flops or _peak(run),
                           _advice(run, fetch / total))
    atomic_write_text(run.run_dir / "profile.txt", result.table + "\n" + describe(result) + "\n")
    return result


def _steps(run: Run, feed: Any, steps: int, ready: Callable[[Any], None]) -> tuple[float, float, int]:
    """One step to warm the profiler, then ``steps`` recorded ones (ProfilerStep#N events, handed to
    ``ready``): their seconds fetching batches, seconds in all, and images."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = run.strategy.device.type == "cuda"
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    fetch = total = 0.0
    seen = 0
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps)  # the profiler's own warm-up step first
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready,
                                acc_events=True) as prof:
        for i in range(steps + 1):
            begin = time.perf_counter()
            with torch.profiler.record_function("data"):
                x, y = next(feed)
            got = time.perf_counter()
            with torch.profiler.record_function("step"):
                run.stepper.step(x, y)
                if cuda:
                    torch.cuda.synchronize(run.strategy.device)
            if i:
                fetch, total, seen = fetch + got - begin, total + time.perf_counter() - begin, seen + x.shape[0]
            prof.step()
    run.stepper.finish()
    return fetch, total, seen


def _peak(run: Run) -> float | None:
    if run.strategy.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(run.strategy.device)
    half = run.cfg.precision in ("16-mixed", "bf16-mixed")
    return next((peaks[0] if half else peaks[1] for key, peaks in PEAKS.items() if key in name), None)


def _advice(run: Run, share: float) -> str | None:
    """What would make the step faster: a precision this CPU emulates, then data wait."""
    notes = (cpu_precision_warning(run.cfg.precision, run.strategy.device.type), _data_advice(run, share))
    return "\n".join(note for note in notes if note) or None


def _data_advice(run: Run, share: float) -> str | None:
    if share <= DATA_WAIT_ADVICE:
        return None
    if isinstance(run.train, LoaderBatches):
        return (f"data wait is {share:.0%} of each step: raise data.num_workers (now {run.cfg.data.num_workers}), "
                f"or let the set be decoded once into memory (data.cache_mb, data.loader: memory)")
    return (f"data wait is {share:.0%} of each step: the in-memory batches' transforms (data.augment, crops, "
            f"flips) cost that on this device; lighter augmentation, or train where the model step is slower")


def describe(r: ProfileResult) -> str:
    """The figures in a few lines (the CLI and profile.txt)."""
    mfu = f"; model FLOPs utilisation {r.mfu:.1%} of {r.peak / 1e12:.0f} TFLOP/s" if r.mfu is not None else \
        "; model FLOPs utilisation: the device's peak is not known (give --peak-tflops)"
    lines = [f"{r.steps} steps: {r.step_s * 1000:.1f} ms per step, {r.images_per_s:.1f} images/s, data wait "
             f"{r.data_wait:.1%} of each step",
             f"{r.flops_per_step / 1e9:.2f} GFLOPs per step (forward + backward), achieved "
             f"{r.achieved / 1e9:.1f} GFLOP/s{mfu}",
             f"trace: {r.trace} (open in https://ui.perfetto.dev or chrome://tracing)"]
    return "\n".join(lines + ([r.advice] if r.advice else []))
