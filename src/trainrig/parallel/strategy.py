"""Strategies: one small object per parallel mode, owning everything parallel about it.

A strategy places the model (``setup``), wraps it for training (``wrap``), reduces floats over ranks,
broadcasts, and takes part in the OOM agreement of a step (``begin_step`` / ``step_failed`` /
``failure_flag``). ``STRATEGIES`` maps ``cfg.strategy`` to its class: a new mode (FSDP) is one class here.
Only this module and ``launch.py`` talk to ``torch.distributed``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainrig.config import Config
from trainrig.errors import ConfigError


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
    """CPU threads per process: the configured number, or this machine's cores shared among local processes."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local_processes))


class SingleStrategy:
    """One process, one device: every collective is the identity."""

    name = "single"
    broken = False  # DDP: an OOM interrupted this rank's reducer; it only mirrors collectives until re-wrapped

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.device = resolve_device(cfg.device, env)
        self.net: nn.Module | None = None  # the wrapped model the step calls (set by wrap)

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
        """Every rank's float64 sum of its parameters (DDP ranks must agree)."""
        return [float(sum(p.detach().double().sum().item() for p in model.parameters()))]

    # OOM agreement: a single process knows of its own OOM at once, so there is nothing to agree on
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


class DataParallelStrategy(SingleStrategy):
    """``nn.DataParallel`` over the local GPUs (a pass-through on CPU)."""

    name = "dp"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        if cfg.device == "auto" and torch.cuda.is_available():
            self.device = torch.device("cuda", 0)

    def wrap(self, model: nn.Module) -> nn.Module:
        gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        if gpus > 1 and self.net is None:
            print("note: strategy dp gathers outputs on one GPU; ddp avoids that imbalance and is usually faster",
                  file=sys.stderr)
        self.net = nn.DataParallel(model) if gpus else nn.DataParallel(model, device_ids=[])
        return self.net


class ModelParallelStrategy(SingleStrategy):
    """The ResNet cut into stages (``split_at``), one device per stage, pipelined with ``split_size``."""

    name = "model_parallel"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.stage_devices = stage_devices(cfg)
        self.device = self.stage_devices[0]  # batches go to the first stage

    def describe(self) -> str:
        return f"{self.name} x1  devices: {', '.join(map(str, self.stage_devices))}"

    def setup(self, model: nn.Module) -> nn.Module:
        import torchvision

        from trainrig.models.parallel import StagedResNet

        if not isinstance(model, torchvision.models.ResNet):
            raise ConfigError(f"strategy=model_parallel splits torchvision ResNets (model.arch resnet*, resnext*, "
                              f"wide_resnet*); {type(model).__name__} ({self.cfg.model.class_path or self.cfg.model.arch}) "
                              f"is not one: use strategy single, dp or ddp")
        try:
            return StagedResNet(model, self.cfg.split_at, self.stage_devices, self.cfg.split_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


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


@dataclass
class _HookState:
    """What the gradient all-reduce hook shares with the step: the failure flag and the buckets sent."""

    flag: torch.Tensor
    world: int
    launched: int = 0
    steps: int = 0


def _allreduce_with_flag(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
    """DDP's all-reduce of one gradient bucket (averaged), plus, with the last bucket, a MAX all-reduce of
    the step's failure flag: the OOM agreement rides on the gradient communication, overlapped with
    backward, and nobody waits on the host for it."""
    state.launched += 1
    buffer = bucket.buffer().div_(state.world)
    future = dist.all_reduce(buffer, async_op=True).get_future()
    if not bucket.is_last():
        return future.then(lambda fut: fut.value()[0])
    flag_work = dist.all_reduce(state.flag, op=dist.ReduceOp.MAX, async_op=True)

    def done(fut: torch.futures.Future) -> torch.Tensor:
        flag_work.wait()
        return fut.value()[0]
    return future.then(done)


class DDPStrategy(SingleStrategy):
    """DistributedDataParallel: DDP's bucketed reducer all-reduces gradients during the backward of a
    step's last micro-batch (earlier ones run under ``no_sync``). The group itself is set up by launch."""

    name = "ddp"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        if cfg.device == "auto" or cfg.device.startswith("cuda"):
            self.device = torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count())) \
                if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.hook: _HookState | None = None
        self.control: Any = None  # the gloo group of any_rank

    @property
    def distributed(self) -> bool:
        return self.env.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return super().wrap(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer broadcast in forward: BatchNorm statistics are synchronised before evaluation
        # instead (sync_buffers), so the only collectives of a step are the gradient buckets
        try:
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False,
                                                           gradient_as_bucket_view=True)
        except TypeError:  # torch before forward_sync_buffers
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                                           gradient_as_bucket_view=True)
        self.hook = _HookState(torch.zeros((), device=self.device), self.env.world_size)
        self.net.register_comm_hook(self.hook, _allreduce_with_flag)
        self.broken = False
        return self.net

    def no_sync(self, last: bool) -> Any:
        if last or not isinstance(self.net, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.net.no_sync()

    def reduce(self, values: Sequence[float]) -> list[float]:
        if not self.distributed:
            return super().reduce(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def min_over_ranks(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_rank(self, value: int) -> Callable[[], int]:
        if not self.distributed:
            return super().any_rank(value)
        if self.control is None:  # a CPU group of its own: no device sync, not queued behind gradient buckets
            self.control = dist.new_group(backend="gloo", timeout=group_timeout(self.cfg))
        flag = torch.tensor([value], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control, async_op=True)

        def result() -> int:
            work.wait()
            return int(flag.item())
        return result

    def sync_buffers(self, model: nn.Module) -> None:
        if self.distributed:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def checksums(self, model: nn.Module) -> list[float]:
        return self.gather(super().checksums(model)[0])

    def begin_step(self) -> None:
        if self.hook is not None:
            self.hook.flag.zero_()
            self.hook.launched = 0
            self.hook.steps += 1

    def step_failed(self) -> None:
        """Raise the flag and send this step's remaining gradient buckets (zeros) through the same hook, in
        the reducer's order, so the peers' all-reduces complete and every rank learns of the failure."""
        if self.hook is None:
            return
        self.hook.flag.fill_(1)
        reducer = self.net.reducer
        works = [reducer._run_comm_hook(bucket) for bucket in reducer._get_zeros_like_grad_buckets()
                 if bucket.index() >= self.hook.launched]
        for work in works:
            work.wait()
        self.broken = True

    def failure_flag(self) -> torch.Tensor | None:
        return None if self.hook is None else self.hook.flag

    def may_defer(self) -> bool:
        return self.hook is not None and self.hook.steps > 1


STRATEGIES: dict[str, type[SingleStrategy]] = {
    "single": SingleStrategy,
    "dp": DataParallelStrategy,
    "ddp": DDPStrategy,
    "model_parallel": ModelParallelStrategy,
}


def make_strategy(cfg: Config, env: DistEnv) -> SingleStrategy:
    return STRATEGIES[cfg.strategy](cfg, env)
