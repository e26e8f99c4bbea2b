"""One optimizer step over micro-batches, surviving out-of-memory, agreed across DDP ranks.

A step cuts the per-rank batch into micro-batches (one, until an OOM), runs forward and backward on each
(the strategy's ``no_sync`` on all but the last, so DDP all-reduces the gradients once, bucketed and
overlapped with the last backward), then steps the optimizer and the per-step schedule.

After an OOM the step's gradients are dropped, memory is freed, the micro-batch is halved (accumulation
doubles: the effective batch and the data order stay the same) and the batch is redone. Under DDP a rank
that runs out of memory raises a flag and sends its remaining gradient buckets as zeros, so its peers'
all-reduces complete; the flag is MAX-reduced with the last bucket (``strategy._allreduce_with_flag``).
Nobody reads it on the host in the step itself: a fused optimizer gets it as ``found_inf`` and skips the
update on the device, and the host looks at a copy of step t's flag just before stepping the optimizer
for step t+1, when the device has long finished step t. If it is set, every rank redoes steps t and t+1
with the smaller micro-batch. Non-fused optimizers and fp16 loss scaling read the flag before their
step instead (one host sync per step, DDP only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from trainrig.errors import OutOfMemory
from trainrig.training.memory import free_memory, is_oom, memory_figures

if TYPE_CHECKING:
    from trainrig.training.state import TrainState
    from trainrig.parallel.base import Strategy

_AMP_DTYPES: dict[str, torch.dtype | None] = {"32": None, "64-true": None, "16-mixed": torch.float16,
                                              "bf16-mixed": torch.bfloat16}


def autocast(device_type: str, precision: str) -> torch.autocast:
    """Autocast for ``precision`` (disabled at 32 and 64-true), shared by training, evaluation and the
    batch-size probe."""
    dtype = _AMP_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: fp16/bf16 autocast outputs go up to float32, float64 stays float64."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _targets(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels where the logits are (model parallel: the last stage); soft targets (mixup / cutmix) in the
    logits' dtype, as the cross-entropy wants them."""
    if y.is_floating_point():
        return y.to(logits.device, logits.dtype, non_blocking=True)
    return y.to(logits.device, non_blocking=True)


# Test-time augmentation: the views of a batch whose logits are averaged (images are N, C, H, W).
TTA_VIEWS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "none": (lambda x: x,),
    "flip": (lambda x: x, lambda x: x.flip(3)),
}


def eval_logits(model: nn.Module, x: torch.Tensor, precision: str, tta: str = "none") -> torch.Tensor:
    """Logits for evaluation and prediction, in full precision: the mean over the ``tta`` views of ``x``."""
    device_type = x.device.type
    views = TTA_VIEWS[tta]
    total = None
    for view in views:
        with autocast(device_type, precision):
            out = full_precision(model(view(x)))
        total = out if total is None else total + out
    return total if len(views) == 1 else total / len(views)


@dataclass
class _Launched:
    """A batch whose forward/backward ran; its update is final once nobody ran out of memory."""

    x: torch.Tensor
    y: torch.Tensor
    lrs: list[float]
    sums: tuple[torch.Tensor, torch.Tensor] | None  # loss sum and correct count; None after an OOM
    flag: torch.Tensor | None  # host copy of the agreed failure flag (DDP)
    reason: str = ""
    scheduled: bool = False

    def failed(self) -> bool:
        return bool(self.flag.item()) if self.flag is not None else self.sums is None


class Stepper:
    """Runs the optimizer steps of an epoch and keeps the committed loss / accuracy sums on the device."""

    def __init__(self, strategy: Strategy, state: TrainState, loss_fn: nn.Module, precision: str, micro: int,
                 log: Callable[[str], None], clip: tuple[float | None, float | None] | None = None):
        self.strategy, self.state, self.loss_fn, self.precision = strategy, state, loss_fn, precision
        self.micro, self.log = micro, log
        self.clip_norm, self.clip_value = clip if clip is not None else (None, None)
        self.grad_norm: torch.Tensor | None = None  # the last step's gradient norm before clipping
        self.device_type = strategy.device.type
        self.fused = any(g.get("fused") for g in state.optimizer.param_groups)
        self.pending: _Launched | None = None
        self.epoch_lr = 0.0  # the lr the epoch under way started with (its metrics row reports it)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = self.correct = torch.zeros((), dtype=torch.float64, device=self.strategy.device)
        self.seen = 0

    @property
    def defer(self) -> bool:
        """Whether the failure flag is read one step late (DDP with a fused optimizer, no loss scaling)."""
        return self.strategy.may_defer() and self.fused and not self.state.scaler.is_enabled()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Train on one batch; returns its mean loss (a device tensor) or None when it was redone."""
        cur = self._launch(x, y)
        defer = self.defer  # decided after _launch counted this step
        prev, self.pending = self.pending, None
        if prev is not None:
            if prev.failed():  # a rank ran out of memory in step t: its update was skipped on the device
                self._recover([prev, cur])
                return None
            self._commit(prev)
        if not defer and cur.failed():
            self._recover([cur])
            return None
        self._apply(cur, defer)
        if defer:
            self.pending = cur
        else:
            self._commit(cur)
        return None if cur.sums is None else cur.sums[0] / x.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Settle the last step; the epoch's loss sum, correct count and samples on this rank."""
        self._settle()
        totals = self.loss_sum, self.correct, self.seen
        self._reset()
        return totals

    def _settle(self) -> None:
        last, self.pending = self.pending, None
        if last is not None:
            self._recover([last]) if last.failed() else self._commit(last)

    def running_totals(self) -> dict[str, float]:
        """The epoch so far, summed over ranks (every rank calls it at the same step): what a mid-epoch
        checkpoint stores so that the resumed epoch reports the metrics of an uninterrupted one."""
        self._settle()
        loss_sum, correct, seen = self.strategy.reduce([float(self.loss_sum), float(self.correct), self.seen])
        return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "lr": self.epoch_lr}

    def restore(self, partial: dict[str, float] | None, is_main: bool) -> None:
        """Continue an epoch from a mid-epoch checkpoint: rank 0 carries the saved sums of every rank."""
        if partial and is_main:
            device = self.strategy.device
            self.loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64, device=device)
            self.correct = torch.tensor(partial["correct"], dtype=torch.float64, device=device)
            self.seen = int(partial["seen"])

    def _launch(self, x: torch.Tensor, y: torch.Tensor) -> _Launched:
        strategy, n = self.strategy, x.shape[0]
        lrs = [g["lr"] for g in self.state.optimizer.param_groups]
        strategy.begin_step()
        self.state.optimizer.zero_grad(set_to_none=True)
        if strategy.broken:  # this rank's reducer was interrupted: only keep the peers' collectives going
            strategy.step_failed()
            return _Launched(x, y, lrs, None, self._flag_copy(), "recovering")
        try:
            sums = self._forward_backward(x, y, n)
        except Exception as exc:
            if not is_oom(exc):
                raise
            strategy.step_failed()
            return _Launched(x, y, lrs, None, self._flag_copy(), str(exc).splitlines()[0][:160])
        return _Launched(x, y, lrs, sums, self._flag_copy())

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        net, scaler = self.strategy.net, self.state.scaler
        chunks = list(zip(x.split(self.micro), y.split(self.micro)))
        loss_sum = correct = None
        for i, (xc, yc) in enumerate(chunks):
            with self.strategy.no_sync(last=i == len(chunks) - 1):
                with autocast(self.device_type, self.precision):
                    logits = net(xc)
                logits = full_precision(logits)
                yc = _targets(yc, logits)
                loss = self.loss_fn(logits, yc)
                scaler.scale(loss * (xc.shape[0] / n) if len(chunks) > 1 else loss).backward()
            hard = yc.argmax(1) if yc.is_floating_point() else yc  # mixup / cutmix: the larger share counts
            batch_loss, batch_correct = loss.detach() * yc.shape[0], (logits.detach().argmax(1) == hard).sum()
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
        return loss_sum, correct

    def _flag_copy(self) -> torch.Tensor | None:
        flag = self.strategy.failure_flag()
        if flag is None:
            return None
        if flag.device.type == "cpu":
            return flag.clone()
        copy = torch.empty((), dtype=flag.dtype, pin_memory=True)
        return copy.copy_(flag, non_blocking=True)

    def _apply(self, launched: _Launched, defer: bool = False) -> None:
        state = self.state
        self._clip()
        if defer:  # the fused kernel skips the update when any rank failed; no host read here
            state.optimizer.grad_scale, state.optimizer.found_inf = None, self.strategy.failure_flag()
        else:  # (never with loss scaling, whose GradScaler sets both itself)
            vars(state.optimizer).pop("found_inf", None)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        if not launched.scheduled:
            state.scheduler.step()
            launched.scheduled = True

    def _clip(self) -> None:
        """optim.clip_grad_value / clip_grad_norm on the reduced gradients (unscaled first under 16-mixed; a
        step whose scaled gradients overflowed is skipped by the scaler all the same). No host sync: the norm
        stays on the device until a logger reads it."""
        if not (self.clip_value or self.clip_norm):
            return
        self.state.scaler.unscale_(self.state.optimizer)
        params = [p for g in self.state.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.clip_value:
            nn.utils.clip_grad_value_(params, self.clip_value)
        if self.clip_norm:
            self.grad_norm = nn.utils.clip_grad_norm_(params, self.clip_norm)

    def _commit(self, launched: _Launched) -> None:
        loss_sum, correct = launched.sums  # type: ignore[misc]
        self.loss_sum = self.loss_sum + loss_sum
        self.correct = self.correct + correct
        self.seen += launched.y.shape[0]

    def _recover(self, todo: list[_Launched]) -> None:
        """Redo ``todo`` in order with ever smaller micro-batches until every rank gets through each."""
        reason = next((t.reason for t in todo if t.reason), "another rank ran out of memory")
        failed = True
        while todo:
            head = todo[0]
            if failed:
                self._shrink(head.x.shape[0], reason)
            redo = self._launch(head.x, head.y)
            failed = redo.failed()  # a host read: this path is rare
            if failed:
                reason = redo.reason or "another rank ran out of memory"
                continue
            for group, lr in zip(self.state.optimizer.param_groups, head.lrs):
                group["lr"] = lr
            redo.scheduled = head.scheduled
            self._apply(redo)
            self._commit(redo)
            todo.pop(0)
        for group, lr in zip(self.state.optimizer.param_groups, self.state.scheduler.get_last_lr()):
            group["lr"] = lr

    def _shrink(self, n: int, reason: str) -> None:
        self.state.optimizer.zero_grad(set_to_none=True)
        free_memory()
        if self.micro <= 1:
            raise OutOfMemory(f"out of memory even at micro-batch 1 ({reason}); {memory_figures()}. Try precision: "
                              f"16-mixed or bf16-mixed, grad_checkpointing: true, or a smaller model") from None
        self.micro = max(1, min(self.micro, n) // 2)
        self.strategy.wrap(self.state.model)  # a fresh DDP reducer on every rank, whatever state the OOM left
        self.log(f"OOM ({reason}): redoing this batch as micro-batch {self.micro} x {-(-n // self.micro)} "
                 f"accumulation (effective batch {n} unchanged)")
