"""What FSDP saves per rank, measured: parameters + gradients + optimizer state, FSDP vs DDP, at 1, 2 (and 4
where there are 4 GPUs) ranks, for ResNet50 and ViT-B/16; and FSDP's training throughput against DDP's.

Each measurement is a group of spawned processes (gloo on the CPU, nccl on GPUs) running trainrig's own
strategy classes (``parallel/ddp.py``, ``parallel/fsdp.py``): the model is set up and wrapped by the strategy,
AdamW takes real steps on random images, then each rank measures what it holds:

- on the CPU, the bytes of the distinct storages behind its parameters, gradients and optimizer state after
  a step (DTensor shards by their local tensor; DDP's gradient buckets counted once) - the live tensors, not a
  formula;
- the rank's peak resident memory (``ru_maxrss``: everything the process touched - torch itself, activations,
  gathered parameters and communication buffers included);
- on a GPU, also ``torch.cuda.max_memory_allocated`` over the steps (activations and communication buffers
  included).

Throughput: images/s of the timed steps after ``--warmup``, global batch ``--batch`` (per rank batch / W).
Run: ``python benchmarks/fsdp_memory.py [--models resnet50 vit_b_16] [--steps 4] [--batch 8]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

import trainrig
from trainrig.parallel import DistEnv, make_strategy
from trainrig.parallel.launch import free_port

SIZES = {"resnet50": 128, "vit_b_16": 224}  # image side per model (ViT-B/16 needs 224)


def _storages(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (local shards of DTensors)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    mib = 2**20
    return {"params_mib": _storages(params) / mib, "grads_mib": _storages(p.grad for p in params) / mib,
            "optimizer_mib": _storages(state) / mib}


def _worker(rank: int, world: int, port: int, args: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        results.put((rank, measure(rank, world, args, gpu)))
    finally:
        dist.destroy_process_group()


def measure(rank: int, world: int, args: dict, gpu: bool) -> dict:
    cfg = trainrig.load_config(None, [f"strategy={args['strategy']}", f"devices={world}", "device=auto"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, channels_last=False))
    strategy = make_strategy(cfg, DistEnv(rank, world, rank, world))
    torch.manual_seed(0)
    model = strategy.setup(torchvision.models.get_model(args["model"], num_classes=10))
    net = strategy.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side, per_rank = SIZES[args["model"]], max(1, args["batch"] // world)
    x = torch.randn(per_rank, 3, side, side, device=strategy.device)
    y = torch.randint(0, 10, (per_rank,), device=strategy.device)
    marks = []
    for step in range(args["warmup"] + args["steps"]):
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: what a step holds at its end
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        if step >= args["warmup"] - 1:
            marks.append(time.perf_counter())
    out = held_bytes(model, optimizer)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out["images_per_s"] = args["steps"] * per_rank * world / (marks[-1] - marks[0])
    if gpu:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(model: str, strategy: str, world: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    spec = {"model": model, "strategy": strategy, "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    mp.start_processes(_worker, args=(world, free_port(), spec, results), nprocs=world, start_method="spawn")
    rows = dict(results.get() for _ in range(world))
    return rows[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES))
    parser.add_argument("--worlds", nargs="+", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    worlds = args.worlds or ([1, 2, 4] if gpus >= 4 else [1, 2])
    where = torch.cuda.get_device_name(0) if gpus else f"CPU ({os.cpu_count()} cores, gloo)"
    print(f"# {where}, torch {torch.__version__}, global batch {args.batch}, {args.steps} timed steps")
    print("| model | ranks | strategy | params MiB | grads MiB | optimizer MiB | sum MiB / rank | peak RSS MiB | "
          "images/s |" + (" CUDA peak MiB |" if gpus else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if gpus else ""))
    table = []
    for model in args.models:
        for world in worlds:
            for strategy in ("ddp", "fsdp"):
                r = run(model, strategy, world, args)
                total = r["params_mib"] + r["grads_mib"] + r["optimizer_mib"]
                table.append({"model": model, "ranks": world, "strategy": strategy, **r, "sum_mib": total})
                print(f"| {model} | {world} | {strategy} | {r['params_mib']:.1f} | {r['grads_mib']:.1f} | "
                      f"{r['optimizer_mib']:.1f} | {total:.1f} | {r['peak_rss_mib']:.0f} | {r['images_per_s']:.2f} |"
                      + (f" {r['cuda_peak_mib']:.0f} |" if gpus else ""), flush=True)
    for model in args.models:
        for world in worlds:
            ddp, fsdp = (next(t for t in table if t["model"] == model and t["ranks"] == world and t["strategy"] == s)
                         for s in ("ddp", "fsdp"))
            print(f"{model} x{world}: FSDP holds {fsdp['sum_mib'] / ddp['sum_mib']:.2f}x DDP's memory per rank, "
                  f"throughput {fsdp['images_per_s'] / ddp['images_per_s']:.2f}x DDP's")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
