"""DistributedDataParallel, with the OOM agreement riding on its gradient all-reduce."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainrig.config import Config
from trainrig.parallel.base import DistEnv
from trainrig.parallel.group import ProcessGroupStrategy


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


class DDPStrategy(ProcessGroupStrategy):
    """DistributedDataParallel: DDP's bucketed reducer all-reduces gradients during the backward of a
    step's last micro-batch (earlier ones run under ``no_sync``). The group itself is set up by launch."""

    name = "ddp"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.hook: _HookState | None = None

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
