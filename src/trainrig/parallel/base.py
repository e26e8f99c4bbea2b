"""The strategy interface, and the single-process mode every other mode extends.

A strategy owns everything about its parallel mode: how many processes it needs and how they start
(``processes`` / ``launch``, class-level: decided before any process exists), where the model goes and how it
is wrapped (``setup`` / ``wrap``), how floats and objects travel between ranks, which ranks write a checkpoint
and how (``save_checkpoint`` / ``load_checkpoint`` / ``load_weights``), and its part in the OOM agreement of a
step. No code outside this package asks for a strategy's name.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.machine import usable_cpus
from trainrig.training import checkpoint
from trainrig.training.state import TrainState

Worker = Callable[["DistEnv", Sequence[Any]], Any]  # (this process's env, the callbacks) -> rank 0's result


@dataclass(frozen=True)
class DistEnv:
    """Rank and world size of this process, read once; a plain single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # under torchrun, Ray Train or another launcher that set RANK / WORLD_SIZE

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


GROUP_MARGIN_S = 30.0  # collectives time out this long after the watchdog (watchdog.py) has spoken


def group_timeout(cfg: Config) -> datetime.timedelta:
    """The process groups' collective timeout: a backstop behind the watchdog's dist_timeout_s."""
    return datetime.timedelta(seconds=cfg.dist_timeout_s + GROUP_MARGIN_S)


def resolve_device(name: str, env: DistEnv | None = None) -> torch.device:
    """``auto`` -> this process's CUDA device if there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (env.local_rank if env else 0) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {name!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for CUDA but no CUDA device is available; use auto or cpu")
    return device


def default_threads(cfg: Config, local_processes: int) -> int:
    """CPU threads per process: the configured number, or the cores this process may use (its affinity, not the
    machine's count) shared among local processes."""
    return cfg.threads or max(1, usable_cpus() // max(1, local_processes))


def device_names(cfg: Config, auto_count: int) -> list[str]:
    """``devices`` as one device name per process (ddp, fsdp) or stage (model_parallel), read here only: a list
    as given; N: N devices; auto: ``auto_count``. Counted devices are this machine's GPUs in turn (device auto
    or cuda, when there are GPUs), else CPU."""
    if isinstance(cfg.devices, list):
        return list(cfg.devices)
    count = cfg.devices if isinstance(cfg.devices, int) else auto_count
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and cfg.device != "cpu" else 0
    return [f"cuda:{i % gpus}" for i in range(count)] if gpus else ["cpu"] * count


class Strategy:
    """One process, one device: every collective is the identity, rank 0 writes whole checkpoints."""

    name = "single"
    broken = False  # DDP: an OOM interrupted this rank's reducer; it only mirrors collectives until re-wrapped
    group = False  # runs as a process group (spawned here, torchrun's or Ray Train's): restarts, launcher: ray

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.device = resolve_device(cfg.device, env)
        self.net: nn.Module | None = None  # the wrapped model the step calls (set by wrap)

    # ------------------------------------------------------------------ processes (before any exists)
    @classmethod
    def processes(cls, cfg: Config) -> int:
        """Processes one run (or one tune trial) starts on this machine."""
        return 1

    @classmethod
    def launch(cls, cfg: Config, worker: Worker, callbacks: Sequence[Any], again: Worker | None = None) -> Any:
        """Run ``worker(env, callbacks)`` in every process of this mode and return rank 0's result."""
        return worker(DistEnv(), callbacks)

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse, in one line naming the key, what this mode cannot do with ``cfg`` (before anything starts)."""

    # ------------------------------------------------------------------ the model
    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def describe(self) -> str:
        return f"{self.name} x{self.env.world_size}  device: {self.device}"

    def setup(self, model: nn.Module) -> nn.Module:
        """Place the (unwrapped) model; its state_dict is what checkpoints hold."""
        return model.to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls; called again when the set of trainable parameters changes."""
        self.net = model
        return self.net

    def no_sync(self, last: bool) -> Any:
        """Context of one micro-batch's forward/backward; ``last`` is the one that synchronises gradients."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ values between ranks
    def reduce(self, values: Sequence[float]) -> list[float]:
        """Sum a few floats over ranks (one collective)."""
        return [float(v) for v in values]

    def min_over_ranks(self, value: int) -> int:
        return value

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def any_rank(self, value: int) -> Callable[[], int]:
        """Start the maximum of a small int over ranks without waiting; the returned function waits for it
        (every rank calls this at the same points: preempt.py's per-step agreement)."""
        return lambda: value

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics) before evaluating or saving."""

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        return [obj]

    def checksums(self, model: nn.Module) -> list[float]:
        """Every rank's float64 sum of the model's parameters (data-parallel ranks must agree)."""
        return [float(sum(p.detach().double().sum().item() for p in model.parameters()))]

    # ------------------------------------------------------------------ checkpoints (every rank calls these)
    def save_checkpoint(self, folder: Path, epoch: int, state: TrainState, extra: dict[str, Any],
                        partial: dict | None = None, best: bool = False) -> None:
        """Write the step checkpoint (``extra``: the config): here rank 0 writes one file with everything."""
        if self.is_main:
            checkpoint.save_step(folder, epoch, state.global_step, {**state.state_dict(partial), **extra}, best=best)

    def load_checkpoint(self, state: TrainState, path: Path) -> None:
        """Resume: every rank reads the checkpoint into its TrainState."""
        state.load_state_dict(checkpoint.load(path))

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """The weights of checkpoint ``path`` into ``model`` on every rank (the final test's chosen one)."""
        model.load_state_dict(self.broadcast(checkpoint.load(path)["model"] if self.is_main else None))

    # ------------------------------------------------------------------ OOM agreement
    # a single process knows of its own OOM at once, so there is nothing to agree on
    def begin_step(self) -> None:
        """A step starts (DDP: reset the failure flag and the bucket count)."""

    def step_failed(self) -> None:
        """This rank ran out of memory mid-step: make the peers' collectives of this step complete."""

    def failure_flag(self) -> torch.Tensor | None:
        """A device tensor, non-zero when any rank failed this step; None where failures are local."""
        return None

    def may_defer(self) -> bool:
        """Whether this step's flag may be read during the next step: true once no collective hides in the
        next forward (DDP rebuilds its buckets, a broadcast, in the forward after a wrap's first step)."""
        return False
