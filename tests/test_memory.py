"""OOM toolkit on CPU: fault injection stands in for CUDA running out of memory."""
import dataclasses
import gc
import warnings
import weakref

import pytest
import torch
from typer.testing import CliRunner

import trainrig
from trainrig.training import checkpoint, memory, optim
from trainrig import models
from trainrig.cli import app
from trainrig.errors import OutOfMemory
from trainrig.training.progress import Progress
from trainrig.training.state import TrainState
from trainrig.training.step import Stepper
from trainrig.parallel import DistEnv, SingleStrategy

from conftest import assert_exit_2
from faults import Recorder, SimulateOOM, check_simulated

runner = CliRunner()
# BatchNorm frozen (eval mode), so micro-batching changes only the order of float64 sums
FROZEN = ["model.finetune=frozen", "data.synthetic_train=256", "data.batch_size=128", "epochs=2", "precision=64-true"]


class Lines(Progress):
    def __init__(self):
        super().__init__(False)
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def trained(result):
    """The trained (floating-point) entries of the run's last state_dict."""
    state = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")["model"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_simulated_oom_recovers_with_same_weights(tiny_cfg):
    """Micro-batching changes nothing but memory (and the order of float64 sums): the weights must match."""
    plain = trainrig.fit(tiny_cfg(*FROZEN, "name=plain"), progress="off")
    lines = Lines()
    shrunk = trainrig.fit(tiny_cfg(*FROZEN, "name=oom"), progress=lines, callbacks=[SimulateOOM(32)])
    assert any("micro-batch 32 x 4 accumulation" in line for line in lines.lines), lines.lines
    assert sum("OOM" in line for line in lines.lines) == 2  # 128 -> 64 -> 32, then it stays at 32
    a, b = trained(plain), trained(shrunk)
    for k in a:
        assert a[k].dtype == torch.float64
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-10), k
    assert shrunk.history[-1]["train_loss"] == pytest.approx(plain.history[-1]["train_loss"], rel=1e-9)


def test_oom_at_micro_batch_one_is_a_clear_error(tiny_cfg):
    with pytest.raises(OutOfMemory, match=r"out of memory even at micro-batch 1 .*host RAM available"):
        trainrig.fit(tiny_cfg(), progress="off", callbacks=[SimulateOOM(0)])


@pytest.fixture(scope="module")
def ddp_plain(tmp_path_factory):
    """The uninterrupted DDP run per optimizer, trained once for every case that compares with it (in a
    folder of the module's: a passing test's tmp_path is removed when it ends)."""
    done = {}
    folder = tmp_path_factory.mktemp("ddp_plain")

    def get(optimizer, cfg):
        if optimizer not in done:
            done[optimizer] = trainrig.fit(dataclasses.replace(cfg, out_dir=str(folder)), progress="off")
        return done[optimizer]
    return get


@pytest.mark.parametrize("optimizer,after", [
    ("adam", 2),  # fused: step 3's flag is read during step 4, whose forward on rank 0 has already run
    ("adam", 0),  # the first step of a DDP wrap is checked at once (its next forward rebuilds DDP's buckets)
    ("sgd", 2),   # foreach: the flag is read before the optimizer step
])
def test_ddp_one_rank_oom_both_shrink_and_finish(tiny_cfg, ddp_plain, optimizer, after):
    base = [*FROZEN, "strategy=ddp", "devices=2", "data.synthetic_test=64", f"optim.name={optimizer}"]
    plain = ddp_plain(optimizer, tiny_cfg(*base, "name=plain"))
    shrunk = trainrig.fit(tiny_cfg(*base, "name=oom"), progress="off",
                          callbacks=[SimulateOOM(16, rank=1, after=after), Recorder(name="log")])
    assert shrunk.param_checksums[0] == shrunk.param_checksums[1]
    log = (shrunk.run_dir / "log-rank0.txt").read_text()  # rank 0 learnt of rank 1's OOM and shrank too
    assert "another rank ran out of memory): redoing this batch as micro-batch 32" in log
    assert "micro-batch 16 x 4 accumulation" in log
    a, b = trained(plain), trained(shrunk)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-10), k
    assert [r["train_loss"] for r in shrunk.history] == pytest.approx([r["train_loss"] for r in plain.history],
                                                                       rel=1e-9)


def test_find_batch_size_under_simulated_limit():
    tried = []

    def step(size):
        tried.append(size)
        check_simulated(size, 100)
    assert memory.find_batch_size(step, start=2, limit=4096, margin=0.1, log=lambda s: None) == 90
    assert tried[:7] == [2, 4, 8, 16, 32, 64, 128]  # doubling, then binary search between 64 and 128
    with pytest.raises(OutOfMemory, match="even batch 2"):
        memory.find_batch_size(lambda s: check_simulated(s, 1), log=lambda s: None)


def test_batch_size_auto_lands_in_saved_config(tiny_cfg):
    lines = Lines()
    result = trainrig.fit(tiny_cfg("data.batch_size=auto", "epochs=1"), progress=lines, callbacks=[SimulateOOM(64)])
    assert result.config.data.batch_size == 57  # 64 minus the 10% margin
    saved = trainrig.load_config(result.run_dir / "config.yaml")
    assert saved.data.batch_size == 57
    assert any("largest batch that ran 64, using 57" in line for line in lines.lines)


def test_cli_batch_size_flag(tmp_path):
    result = runner.invoke(app, ["fit", "-c", "configs/smoke.yaml", "--quiet", "--batch-size", "auto", "--set",
                                 f"out_dir={tmp_path}", "--set", "epochs=1", "--set", "data.synthetic_train=256",
                                 "--set",
                                 "callbacks=[{class_path: faults.SimulateOOM, init_args: {above: 32}}]"])
    assert result.exit_code == 0, result.output
    assert trainrig.load_config(tmp_path / "smoke" / "config.yaml").data.batch_size == 28


def test_label_out_of_range_exit_2(tmp_path):
    base = ["fit", "-c", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={tmp_path}"]
    assert_exit_2(runner.invoke(app, [*base, "--set", "model.num_classes=5"]),
                  "labels go up to 9 but model.num_classes=5")


def test_gpus_without_gpu_exits_0():
    result = runner.invoke(app, ["gpus"])
    assert result.exit_code == 0
    if not torch.cuda.is_available():
        assert "no CUDA GPU visible" in result.output and "host RAM" in result.output


def test_memory_helpers_run_anywhere():
    with memory.memory_report() as report:
        torch.ones(10)
    assert report.lines() == [] or all("allocated" in line for line in report.lines())
    memory.free_memory()
    assert memory.is_oom(torch.cuda.OutOfMemoryError("x"))
    assert memory.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert not memory.is_oom(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(tiny_cfg, precision):
    """It trains, and the log warns exactly when this CPU has no instructions for the type (oneDNN's own
    check): autocast then emulates it, ~10x slower than float32 (an AVX2 EPYC)."""
    result = trainrig.fit(tiny_cfg(f"precision={precision}", "epochs=1"), progress="off")
    assert 0 < result.history[0]["train_loss"] < 10
    native = {"bf16-mixed": torch.ops.mkldnn._is_mkldnn_bf16_supported,
              "16-mixed": torch.ops.mkldnn._is_mkldnn_fp16_supported}[precision]()
    warned = f"warning: precision {precision} on a CPU without" in (result.run_dir / "log.txt").read_text()
    assert warned == (not native)


def test_grad_checkpointing_same_gradients():
    """The same computation, recomputed: compared in float64."""
    torch.manual_seed(0)
    plain = models.build_model(trainrig.load_config(None).model, seed=0).double()
    ckpt = models.build_model(trainrig.load_config(None).model, seed=0).double()
    models.enable_grad_checkpointing(ckpt, ("layer1", "layer2", "layer3", "layer4"))
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.arange(4)
    for m in (plain, ckpt):
        m.eval()  # running statistics: the recomputed forward must match exactly
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12), name
    assert set(plain.state_dict()) == set(ckpt.state_dict())  # checkpoints stay interchangeable


def test_step_frees_its_graph_and_memory_stays_flat(tiny_cfg):
    """The loop keeps floats, not tensors: the loss's autograd graph dies with the step."""
    cfg = tiny_cfg()
    model = models.build_model(cfg.model, seed=0)
    opt = optim.build_optimizer(models.param_groups(model, models.layout_of(model, cfg.model), cfg.model, 1e-3), cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    strategy = SingleStrategy(cfg, DistEnv())
    strategy.wrap(model)
    state = TrainState(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False))
    refs = []

    class Watched(torch.nn.CrossEntropyLoss):
        def forward(self, logits, y):
            loss = super().forward(logits, y)
            refs.append(weakref.ref(loss))
            return loss
    batches = [(torch.randn(8, 1, 28, 28), torch.arange(8) % 10) for _ in range(3)]
    counts = []
    stepper = Stepper(strategy, state, Watched(), "32", 8, print)
    for _ in range(4):
        for x, y in batches:
            stepper.step(x, y)
        stats = [float(v) for v in stepper.finish()]
        gc.collect()
        with warnings.catch_warnings():  # isinstance() touches deprecated torch.distributed aliases
            warnings.simplefilter("ignore")
            counts.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
        assert stats[2] == 24
    assert all(r() is None for r in refs)
    assert counts[-1] <= counts[1]  # no tensors pile up from one epoch to the next
