"""Process topology and launching: the only module that talks to ``torch.distributed``.

``launch(cfg, worker)`` runs ``worker(ctx)`` once per process the strategy needs: in this process for
single / dp / model_parallel; for ddp either in the group a launcher (torchrun) set up, or in ``nprocs``
workers started here with ``torch.multiprocessing.spawn`` on a free loopback port.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch import nn

from .config import Config
from .errors import ConfigError, TrainrigError


class WorkerFailed(Exception):
    """A DDP rank raised; the message names the rank and its error (the CLI exits 1, not 2)."""


@dataclass(frozen=True)
class DistEnv:
    """Rank and world size of this process, read once; a plain single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # under torchrun (or another launcher that set RANK / WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), launched=True)
        return cls()


@dataclass
class Context:
    """What a worker needs to know about its place: rank, device(s) and the collectives it may call."""

    env: DistEnv
    device: torch.device                       # where batches go (the first stage for model_parallel)
    strategy: str = "single"
    stage_devices: list[torch.device] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return self.strategy == "ddp" and self.env.world_size > 1

    def all_reduce_sum(self, values: Sequence[float | int]) -> list[float]:
        """Sum a few numbers over all ranks (one collective); a no-op for one process."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def agree_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (e.g. "I ran out of memory")."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def min_over_ranks(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    @staticmethod
    def no_sync(net: nn.Module) -> Any:
        """DDP's context for micro-batches whose gradients are accumulated before one all-reduce."""
        return net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_grads(self, model: nn.Module) -> None:
        """Average the accumulated gradients over ranks (after agree_any). Each gradient is reduced in place,
        all in flight at once: flattening channels_last gradients into one buffer would cost two strided
        copies per step, more than the few extra collectives."""
        if not self.distributed:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()
        torch._foreach_div_(grads, float(self.env.world_size))

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating or saving."""
        if self.distributed:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def gather_checksums(self, model: nn.Module) -> list[float]:
        """Every rank's float64 sum of its parameters (one entry for a single process)."""
        total = float(sum(p.detach().double().sum().item() for p in model.parameters()))
        if not self.distributed:
            return [total]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, total)
        return out


# ----------------------------------------------------------------------------- devices

def resolve_device(name: str, env: DistEnv | None = None) -> torch.device:
    """``auto`` -> the process's CUDA device if there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            local = env.local_rank if env else 0
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {name!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for CUDA but no CUDA device is available; use auto or cpu")
    return device


def ddp_world_size(cfg: Config) -> int:
    """Processes to start for ddp: ``devices: N``, a list's length, or auto (each GPU, else 2 CPU processes)."""
    if isinstance(cfg.devices, int):
        return cfg.devices
    if isinstance(cfg.devices, list):
        return len(cfg.devices)
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def stage_devices(cfg: Config) -> list[torch.device]:
    """One device per model-parallel stage: the given list, N GPUs, or auto (a GPU per stage, else CPU)."""
    n_stages = len(cfg.split_at) + 1
    if isinstance(cfg.devices, list):
        names = cfg.devices
    elif torch.cuda.is_available():
        count = cfg.devices if isinstance(cfg.devices, int) else n_stages
        names = [f"cuda:{i % torch.cuda.device_count()}" for i in range(count)]
    else:
        names = ["cpu"] * (cfg.devices if isinstance(cfg.devices, int) else n_stages)
    if len(names) != n_stages:
        raise ConfigError(f"devices: {len(names)} devices for {n_stages} stages (split_at: {cfg.split_at}); "
                          f"give one device per stage")
    return [resolve_device(n) for n in names]


def backend_for(cfg: Config, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def default_threads(cfg: Config, local_processes: int) -> int:
    """CPU threads per process: the configured number, or this machine's cores shared among local processes."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local_processes))


# ----------------------------------------------------------------------------- wrapping

def _wrap_dp(model: nn.Module, ctx: Context) -> nn.Module:
    n_gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    if n_gpus > 1:
        print("note: strategy dp gathers outputs on one GPU; ddp avoids that imbalance and is usually faster",
              file=sys.stderr)
    return nn.DataParallel(model) if n_gpus else nn.DataParallel(model, device_ids=[])


def _wrap_ddp(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Steps run their micro-batches under no_sync() and all-reduce gradients once, after the ranks agreed
    # that nobody ran out of memory (memory.MicroBatcher); so no collective may hide in forward either:
    # BatchNorm statistics are synchronised once per epoch instead (Context.sync_buffers).
    try:
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    except TypeError:  # torch before forward_sync_buffers
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


_WRAPPERS: dict[str, Callable[[nn.Module, Context], nn.Module]] = {
    "single": lambda model, ctx: model,
    "model_parallel": lambda model, ctx: model,  # staged by models.parallel; nothing to wrap
    "dp": _wrap_dp,
    "ddp": _wrap_ddp,
}


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The model the training step calls; the caller keeps the unwrapped one for saving its state_dict."""
    return _WRAPPERS[ctx.strategy](model, ctx)


# ----------------------------------------------------------------------------- launching

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_context(cfg: Config) -> Context:
    if cfg.strategy == "model_parallel":
        devices = stage_devices(cfg)
        return Context(DistEnv(), devices[0], cfg.strategy, devices)
    if cfg.strategy == "dp" and cfg.device == "auto" and torch.cuda.is_available():
        return Context(DistEnv(), torch.device("cuda", 0), cfg.strategy)
    return Context(DistEnv(), resolve_device(cfg.device), cfg.strategy)


def _ddp_context(cfg: Config, env: DistEnv) -> Context:
    if cfg.device == "auto" or cfg.device.startswith("cuda"):
        device = torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count())) \
            if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Context(env, device, "ddp")


def _run_in_group(cfg: Config, env: DistEnv, worker: Callable[[Context], Any], init_method: str) -> Any:
    ctx = _ddp_context(cfg, env)
    dist.init_process_group(backend_for(cfg, ctx.device), init_method=init_method, rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    try:
        return worker(ctx)
    finally:
        dist.destroy_process_group()


def _spawn_entry(local_rank: int, world: int, port: int, cfg: Config, worker: Callable[[Context], Any],
                 results: Any) -> None:
    env = DistEnv(rank=local_rank, world_size=world, local_rank=local_rank, local_world_size=world)
    try:
        result = _run_in_group(cfg, env, worker, f"tcp://127.0.0.1:{port}")
        if env.is_main:
            results.put(("ok", local_rank, result))
    except BaseException as exc:  # report this rank's error in one line, then fail the process
        # bad input stays a TrainrigError (exit 2) in the parent; anything else becomes one line naming the rank
        report = exc if isinstance(exc, TrainrigError) else f"rank {local_rank} failed: {type(exc).__name__}: {exc}"
        results.put(("error", local_rank, report))
        if not isinstance(exc, TrainrigError):
            traceback.print_exc()
        raise


def launch(cfg: Config, worker: Callable[[Context], Any]) -> Any:
    """Run ``worker`` as the strategy says and return rank 0's result."""
    if cfg.strategy != "ddp":
        return worker(_local_context(cfg))
    env = DistEnv.from_environ()
    if env.launched:  # torchrun set up the group's rendezvous; join it
        return _run_in_group(cfg, env, worker, "env://")
    world = ddp_world_size(cfg)
    if world < 1:
        raise ConfigError(f"devices: ddp needs at least one process, got {cfg.devices!r}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    try:
        mp.spawn(_spawn_entry, args=(world, free_port(), cfg, worker, results), nprocs=world, join=True)
    except ProcessException as exc:  # spawn already ended the other ranks
        errors = _drain(results, "error")
        first = exc.error_index
        message = errors.get(first) or next(iter(errors.values()), None)
        if isinstance(message, TrainrigError):
            raise message from None
        raise WorkerFailed(message or f"rank {first} died ({exc})") from None
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


__all__ = ["Context", "DistEnv", "WorkerFailed", "launch", "wrap", "resolve_device",
           "stage_devices", "ddp_world_size", "default_threads", "free_port"]
