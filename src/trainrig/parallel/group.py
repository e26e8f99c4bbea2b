"""The modes that train as a group of processes, one per device (ddp, fsdp): how the group starts (spawned
here, torchrun's, or Ray Train's; launch.py), each rank's device, and the collectives every such mode shares."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.parallel.launch import join_group, spawn_group
from trainrig.parallel.base import DistEnv, Strategy, Worker, device_names, group_timeout, resolve_device


class ProcessGroupStrategy(Strategy):
    """A process per device in a torch.distributed group; collectives over it (a CPU gloo group of its own
    for ``any_rank``). Subclasses say how the model is wrapped and how gradients are reduced."""

    group = True

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        if cfg.device == "auto" or cfg.device.startswith("cuda"):
            names = device_names(cfg, env.local_world_size)
            self.device = resolve_device(names[env.local_rank % len(names)]) if names else self.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.control: Any = None  # the gloo group of any_rank

    @classmethod
    def processes(cls, cfg: Config) -> int:
        """``devices``: N, a list's length, or auto (each GPU, else 2 CPU processes)."""
        return len(device_names(cfg, torch.cuda.device_count() if torch.cuda.is_available() else 2))

    @classmethod
    def launch(cls, cfg: Config, worker: Worker, callbacks: Sequence[Any], again: Worker | None = None) -> Any:
        """In the group torchrun or Ray Train set up, or in ``processes(cfg)`` processes spawned here (restarted
        up to ``restarts`` times from the newest checkpoint, running ``again``)."""
        env = DistEnv.from_environ()
        if env.launched:
            return join_group(cfg, env, worker, callbacks)
        world = cls.processes(cfg)
        if world < 1:
            raise ConfigError(f"devices: {cfg.strategy} needs at least one process, got {cfg.devices!r}")
        return spawn_group(cfg, world, worker, callbacks, again)

    @property
    def distributed(self) -> bool:
        return self.env.world_size > 1

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
