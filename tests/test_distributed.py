"""DDP with gloo on 2 CPU processes, torchrun, failure handling, DataParallel and model parallel on CPU."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

import trainrig
from trainrig.trained.inference import evaluate_checkpoint

from conftest import RESNET
from trainrig.training import checkpoint, optim
from trainrig import data, models
from trainrig.parallel.launch import WorkerFailed
from trainrig.models.parallel import StagedResNet, model_parallel_resnet50, stage_names

from faults import FailOnRank, Recorder

DDP = ["strategy=ddp", "devices=2", "data.synthetic_train=128", "data.synthetic_test=101", "data.batch_size=32",
       "epochs=1", "optim.name=adamw"]
F64 = "precision=64-true"  # "the same computation" claims are checked in float64: any torch build, any CPU


def reference_params(cfg: trainrig.Config, world: int = 2, before_step=None) -> dict[str, torch.Tensor]:
    """One process over the same global batches: each rank's shard is a micro-batch (BatchNorm statistics
    per shard, as on the ranks) and gradients are averaged over shards before one optimizer step
    (``before_step(model)`` runs just before it, e.g. to clip). Same thread count as the ranks: a different
    one changes float summation order in conv backward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _reference(cfg, world, before_step or (lambda model: None))
    finally:
        torch.set_num_threads(threads)


def _reference(cfg, world, before_step):
    torch.manual_seed(cfg.seed)
    model = models.build_model(cfg.model, seed=cfg.seed).double()
    model = model.to(memory_format=torch.channels_last) if cfg.model.channels_last else model
    opt = optim.build_optimizer(models.param_groups(model, models.layout_of(model, cfg.model), cfg.model, cfg.optim.lr), cfg.optim)
    shards = [data.build(cfg.data, device=torch.device("cpu"), seed=cfg.seed, rank=r, world=world,
                         dtype=torch.float64)[0] for r in range(world)]
    model.train()
    for epoch in range(cfg.epochs):
        for s in shards:
            s.set_epoch(epoch)
        for batches in zip(*shards):
            opt.zero_grad()
            for x, y in batches:
                (torch.nn.functional.cross_entropy(model(x), y) / world).backward()
            before_step(model)
            opt.step()
    return model.state_dict()


def test_ddp_two_ranks_agree_and_match_single_process(tiny_cfg):
    """Flips on: each rank augments with its own stream, and the reference uses the same per-rank streams. The
    final test report under DDP equals one process's."""
    cfg = tiny_cfg(*DDP, "epochs=2", F64, "data.flip=true")
    recorders = [Recorder(every_rank=True, name="all"), Recorder(name="main")]
    result = trainrig.fit(cfg, progress="off", callbacks=recorders)
    assert len(result.param_checksums) == 2 and result.param_checksums[0] == result.param_checksums[1]
    saved = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")["model"]
    expected = reference_params(cfg)
    for name, value in expected.items():
        if "running" in name or "num_batches" in name:
            continue  # buffers: DDP broadcasts rank 0's; parameters are what must agree
        assert saved[name].dtype == torch.float64
        assert torch.allclose(saved[name], value, rtol=0, atol=1e-9), name
    # the final test: every sample counted exactly once (101 over 2 ranks: 51 and 50, no padding duplicate),
    # and the report gathered over the ranks is the one a single process computes on the same checkpoint
    assert result.test["samples"] == 101 and sum(c["support"] for c in result.test["per_class"]) == 101
    one = evaluate_checkpoint(result.run_dir / "checkpoints" / "best.pt", trust_class_path=True)["report"]
    for key in ("confusion_matrix", "per_class", "accuracy", "top5_accuracy", "macro_f1", "classes"):
        assert result.test[key] == one[key], key
    # sums in another order (ranks, batches of other images): float64 rounding apart
    assert result.test["loss"] == pytest.approx(one["loss"], rel=1e-9)
    assert result.test["ece"] == pytest.approx(one["ece"], rel=1e-6)
    assert [m["index"] for m in result.test["mistakes"]] == [m["index"] for m in one["mistakes"]]
    # callbacks under DDP: every_rank ones ran on both ranks, rank-zero ones on rank 0 only, rows as returned
    run = result.run_dir
    assert sorted(p.name for p in run.glob("*-rank*.txt")) == ["all-rank0.txt", "all-rank1.txt", "main-rank0.txt"]
    for name in ("all-rank0.txt", "all-rank1.txt", "main-rank0.txt"):
        lines = (run / name).read_text().splitlines()
        assert lines[0] == "fit_start" and lines[-1] == "fit_end"
        assert [line for line in lines if line.startswith("epoch_start")] == ["epoch_start 1 4", "epoch_start 2 4"]
        assert sum(line.startswith("batch") for line in lines) == 8  # 64 images per rank, 16 per batch, 2 epochs
    ends = [line for line in (run / "main-rank0.txt").read_text().splitlines() if line.startswith("epoch_end")]
    assert ends == [f"epoch_end {r['epoch']} {r['train_loss']:.6f} {r['val_acc']:.6f}" for r in result.history]


def test_ddp_global_batch_must_divide(tiny_cfg):
    with pytest.raises(trainrig.TrainrigError, match="data.batch_size=33 is the global batch"):
        trainrig.fit(tiny_cfg(*DDP, "data.batch_size=33"), progress="off")


def test_failing_rank_ends_every_rank(tiny_cfg, tmp_path):
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"rank 1 failed: RuntimeError: injected failure on rank 1"):
        trainrig.fit(tiny_cfg(*DDP, "dist_timeout_s=30"), progress="off", callbacks=[FailOnRank(1)])
    assert time.monotonic() - start < 60


def test_cli_failing_rank_exit_code(tmp_path):
    """A callback named in the config (class_path), here the test-only fault injector."""
    cmd = [sys.executable, "-m", "trainrig", "fit", "-c", "configs/smoke.yaml", "--quiet", "--set",
           f"out_dir={tmp_path}", "--set", "strategy=ddp", "--set", "devices=2", "--set", "threads=1",
           "--set", "data.synthetic_train=64",
           "--set", "callbacks=[{class_path: faults.FailOnRank, init_args: {rank: 0}}]"]
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: rank 0 failed: RuntimeError: injected failure")
    assert time.monotonic() - start < 60


def test_dp_is_a_pass_through_on_cpu(tiny_cfg):
    single = trainrig.fit(tiny_cfg("epochs=1", "name=single"), progress="off")
    dp = trainrig.fit(tiny_cfg("epochs=1", "name=dp", "strategy=dp"), progress="off")
    assert dp.history[0]["train_loss"] == pytest.approx(single.history[0]["train_loss"], rel=1e-6)


# ----------------------------------------------------------------------------- model parallel

def test_stage_names():
    assert stage_names(["layer3"]) == [["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"],
                                       ["layer3", "layer4", "avgpool", "fc"]]
    assert len(stage_names(["layer2", "layer4"])) == 3
    with pytest.raises(ValueError, match="not ResNet stages"):
        stage_names(["layer9"])


def _grads(model, x, y):
    model.zero_grad()
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_parallel_resnet50_equals_single_device():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(num_classes=10).double()
    staged = model_parallel_resnet50(["cpu", "cpu"], num_classes=10).double()
    staged.load_state_dict(reference.state_dict())  # same parameter names as the plain ResNet
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.arange(8) % 10
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        staged.train(mode == "train")
        out_a, grads_a = _grads(reference, x, y)
        out_b, grads_b = _grads(staged, x, y)
        assert torch.allclose(out_a, out_b, rtol=0, atol=1e-10), mode
        for name, g in grads_a.items():
            assert torch.allclose(g, grads_b[name], rtol=0, atol=1e-10), (mode, name)


@pytest.mark.parametrize("split_size", [1, 2, 4])
def test_pipelined_gradients_equal_plain(split_size):
    """Eval-mode BatchNorm (running statistics) so micro-batches do not change what is computed (float64)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).double()
    plain = StagedResNet(net, ["layer2", "layer4"], ["cpu", "cpu", "cpu"]).eval()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.arange(8) % 10
    out_a, grads_a = _grads(plain, x, y)
    plain.split_size = split_size
    out_b, grads_b = _grads(plain, x, y)
    assert torch.allclose(out_a, out_b, rtol=0, atol=1e-10)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], rtol=0, atol=1e-10), name


def test_model_parallel_fit_on_two_cpu_devices(tiny_cfg):
    result = trainrig.fit(tiny_cfg("epochs=1", "strategy=model_parallel", "devices=[cpu, cpu]", "split_size=8", RESNET),
                          progress="off")
    assert result.history[0]["train_loss"] > 0
    state = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")["model"]
    assert "layer3.0.conv1.weight" in state  # a plain ResNet state_dict: loads into single-device runs
    with pytest.raises(trainrig.ConfigError, match="2 devices for 3 stages"):
        trainrig.fit(tiny_cfg("strategy=model_parallel", "devices=[cpu, cpu]", "split_at=[layer2, layer3]", RESNET),
                     progress="off")


def test_gradual_unfreezing_rewraps_ddp(tiny_cfg):
    """DDP registers the trainable parameters when it wraps: a stage unfrozen later must train on every rank."""
    cfg = tiny_cfg(*DDP, "epochs=3", "model.finetune=gradual", "data.synthetic_train=64", RESNET)
    result = trainrig.fit(cfg, progress="off")
    assert result.param_checksums[0] == result.param_checksums[1]
    initial = models.build_model(cfg.model, seed=cfg.seed).state_dict()
    trained = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")["model"]
    changed = {k.split(".")[0] for k in initial if "running" not in k and not torch.equal(initial[k], trained[k])}
    assert {"layer4", "layer3", "fc", "conv1"} <= changed and "layer1" not in changed  # epochs 2, 3 unfroze 4, 3


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and 2 CPUs")
def test_default_threads_follow_the_cpus_the_process_may_use(tmp_path):
    """Confined to one core (taskset; a container's or Slurm's cpuset alike), a run takes 1 thread, not the
    machine's count."""
    code = ("import trainrig; from trainrig.parallel import default_threads; "
            "print(default_threads(trainrig.load_config(None), 1))")
    confined = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert confined.stdout.split() == ["1"], confined.stderr[-2000:]
    assert free.stdout.split() == [str(len(os.sched_getaffinity(0)))], free.stderr[-2000:]
