"""Fully sharded data parallel (FSDP2): each rank holds 1/world of the parameters, gradients and optimizer
state, and gathers a block's full parameters only while it runs - for models that do not fit one device with
their optimizer state, after smaller batches, mixed precision and gradient checkpointing.

``fully_shard`` is applied to every repeated block (``blocks``), then at the root.
Checkpoints are sharded: every rank writes its part through ``torch.distributed.checkpoint``, which reshards
on load, so a run resumes at another world size, and ``trainer eval / predict / export`` read it on one
process (training/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from trainrig.config import Config
from trainrig.errors import ConfigError, OutOfMemory
from trainrig.parallel.group import ProcessGroupStrategy
from trainrig.training import checkpoint
from trainrig.training.state import TrainState

PARAM_DTYPES = {"bf16-mixed": torch.bfloat16}  # precision -> FSDP's compute dtype for gathered parameters


class FSDPStrategy(ProcessGroupStrategy):
    """``strategy: fsdp``: ``fully_shard`` per block and at the root over a 1-D mesh of every rank;
    gradients reduce-scattered (averaged) in backward; checkpoints written by every rank, one shard each."""

    name = "fsdp"

    @classmethod
    def check(cls, cfg: Config) -> None:
        if cfg.model.ema.decay:
            raise ConfigError("model.ema: not with strategy fsdp (the average would be a second full copy of the "
                              "weights on every rank); use strategy ddp, or no model.ema")
        if cfg.model.compile:
            raise ConfigError("model.compile: not with strategy fsdp yet (torch.compile of sharded blocks is "
                              "untested here); use strategy ddp, or model.compile: false")
        if cfg.precision == "16-mixed":
            raise ConfigError("precision: 16-mixed needs a loss scaler that knows the shards; with strategy fsdp "
                              "use bf16-mixed (parameters gathered in bfloat16, gradients reduced in float32)")

    def setup(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh  # here: 0.7 s to import with checkpoint's
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        # FSDP2 shards contiguous parameters only: model.channels_last keeps the inputs channels-last
        model = model.to(self.device, memory_format=torch.contiguous_format)
        mesh = init_device_mesh(self.device.type, (self.env.world_size,))
        options = dict(mesh=mesh, reshard_after_forward=self.cfg.fsdp.reshard_after_forward,
                       mp_policy=MixedPrecisionPolicy(param_dtype=PARAM_DTYPES.get(self.cfg.precision),
                                                      reduce_dtype=torch.float32
                                                      if self.cfg.precision in PARAM_DTYPES else None),
                       offload_policy=CPUOffloadPolicy() if self.cfg.fsdp.cpu_offload else OffloadPolicy())
        for block in blocks(model):
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model

    def no_sync(self, last: bool) -> Any:
        return contextlib.nullcontext() if last or self.net is None else self._accumulating()

    @contextlib.contextmanager
    def _accumulating(self) -> Iterator[None]:
        """A micro-batch before the step's last: gradients accumulate unsharded, no reduce-scatter."""
        self.net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.net.set_requires_gradient_sync(True)

    def checksums(self, model: nn.Module) -> list[float]:
        total = sum(float(p.detach().full_tensor().double().sum()) for p in model.parameters())
        return self.gather(total)

    def step_failed(self) -> None:
        raise OutOfMemory("out of memory under strategy fsdp, which cannot redo a step with smaller micro-batches "
                          "(its peers wait in this step's reduce-scatter): lower data.batch_size, or use "
                          "precision: bf16-mixed, grad_checkpointing: true or fsdp.cpu_offload: true")

    # ------------------------------------------------------------------ sharded checkpoints
    def save_checkpoint(self, folder: Path, epoch: int, state: TrainState, extra: dict[str, Any],
                        partial: dict | None = None, best: bool = False) -> None:
        """Every rank writes its shard of the model and optimizer state into a temporary folder, renamed when
        all are done; then rank 0 writes the step file naming it (so a step file always names whole shards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = checkpoint.step_file(folder, epoch, state.global_step)
        shards = checkpoint.shards_folder(path)
        tmp = folder / f".{shards.name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(state.model, state.optimizer)
        # buffers (BatchNorm statistics) are replicated, each rank its own: rank 0's are saved, as under ddp
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp),
                 planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True))
        if self.is_main:  # dcp.save returns on every rank once the metadata is written
            shutil.rmtree(shards, ignore_errors=True)
            tmp.rename(shards)
            small = {**state.progress_dict(partial), **extra, checkpoint.SHARDS: shards.name}
            checkpoint.save_step(folder, epoch, state.global_step, small, best=best)
        dist.barrier()  # no rank reads or prunes before the step file exists

    def load_checkpoint(self, state: TrainState, path: Path) -> None:
        """Every rank reads its part of the shards, resharded to this world size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        saved = self._step_file(path)
        model_state, optim_state = get_state_dict(state.model, state.optimizer)
        target = {"model": model_state, "optimizer": optim_state}
        dcp.load(target, checkpoint_id=str(path.parent / saved[checkpoint.SHARDS]))
        set_state_dict(state.model, state.optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optimizer"])
        state.load_progress(saved)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        saved = self._step_file(path)
        target = get_model_state_dict(model)
        dcp.load({"model": target}, checkpoint_id=str(path.parent / saved[checkpoint.SHARDS]))
        set_model_state_dict(model, target)

    @staticmethod
    def _step_file(path: Path) -> dict[str, Any]:
        saved = checkpoint.load(path, shards=False)  # each rank reads its own part of the shards
        if not saved.get(checkpoint.SHARDS):
            raise ConfigError(f"{path}: a whole-model checkpoint (not written by strategy fsdp); resume it with "
                              f"the strategy that wrote it")
        return saved


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: in every Sequential / ModuleList, the children whose class occurs
    there at least twice and that hold parameters (a ResNet's residual blocks, a ViT's encoder layers, a
    ConvNeXt's CNBlocks), outermost first, none inside another. What they leave out is sharded at the root."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        counts = Counter(type(c) for c in module.children())
        repeated = isinstance(module, (nn.Sequential, nn.ModuleList))
        for child in module.children():
            if repeated and counts[type(child)] >= 2 and any(True for _ in child.parameters()):
                found.append(child)
            else:
                visit(child)
    visit(model)
    return found
