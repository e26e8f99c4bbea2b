"""Checks that need CUDA; CI has no GPU and deselects them (-m 'not gpu'). Run: pytest -m gpu."""
import pytest
import torch

import trainrig

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")


def test_fit_on_cuda_with_nccl_ddp(tmp_path):
    base = ["data.name=synthetic", "epochs=1", f"out_dir={tmp_path}", "data.synthetic_train=512"]
    single = trainrig.fit(trainrig.load_config(None, base + ["name=single"]), progress="off")
    assert single.history[0]["train_loss"] > 0
    ddp = trainrig.fit(trainrig.load_config(None, base + ["name=ddp", "strategy=ddp", "devices=1"]), progress="off")
    assert ddp.history[0]["test_samples"] == 512


def test_model_parallel_on_one_gpu_twice(tmp_path):
    cfg = trainrig.load_config(None, ["data.name=synthetic", "epochs=1", f"out_dir={tmp_path}", "model.arch=resnet50",
                                      "strategy=model_parallel", "devices=[cuda:0, cuda:0]", "split_size=16"])
    assert trainrig.fit(cfg, progress="off").history[0]["train_loss"] > 0


def test_ddp_oom_agreement_on_cuda(tmp_path):
    """Two gloo ranks sharing the GPU: the failure flag's pinned copy and the fused found_inf skip on CUDA."""
    from faults import SimulateOOM

    base = ["data.name=synthetic", "data.synthetic_train=256", "data.batch_size=128", "epochs=2", f"out_dir={tmp_path}",
            "strategy=ddp", "devices=2", "backend=gloo", "model.finetune=frozen", "precision=64-true"]
    plain = trainrig.fit(trainrig.load_config(None, base + ["name=plain"]), progress="off")
    shrunk = trainrig.fit(trainrig.load_config(None, base + ["name=oom"]), progress="off",
                          callbacks=[SimulateOOM(16, rank=1, after=2)])
    assert shrunk.param_checksums[0] == shrunk.param_checksums[1]
    assert [r["train_loss"] for r in shrunk.history] == pytest.approx([r["train_loss"] for r in plain.history],
                                                                       rel=1e-9)


def test_real_cuda_oom_is_recovered_by_smaller_micro_batches(tmp_path):
    """A real allocator OOM: this process may use only ~3 GiB of the card, and a ResNet50 step on 256 images of
    224x224 needs far more; the step is redone as micro-batches (same effective batch) and training goes on."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total, 0)
    lines = []

    class Lines(trainrig.Callback):
        def on_message(self, run, text):
            lines.append(text)

    try:
        cfg = trainrig.load_config(None, ["data.name=synthetic", "data.synthetic_train=512", "data.synthetic_test=64",
                                          "data.image_size=224", "data.batch_size=256", "data.eval_batch_size=32",
                                          "model.arch=resnet50",
                                          "model.in_channels=3", "epochs=1", f"out_dir={tmp_path}"])
        result = trainrig.fit(cfg, progress="off", callbacks=[Lines()])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    assert any(line.startswith("OOM (") and "effective batch 256 unchanged" in line for line in lines), lines
    assert result.history[0]["train_loss"] == result.history[0]["train_loss"]  # not NaN


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_with_ema_and_tta(tmp_path, precision):
    from trainrig import checkpoint

    cfg = trainrig.load_config(None, ["data.name=synthetic", "data.synthetic_train=1024", "epochs=2",
                                      f"precision={precision}", "model.ema.decay=0.99", "eval.tta=flip",
                                      f"out_dir={tmp_path}"])
    result = trainrig.fit(cfg, progress="off")
    losses = [r["train_loss"] for r in result.history]
    assert all(loss == loss for loss in losses) and losses[1] < losses[0]
    saved = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")
    assert saved["ema_updates"] == 2 * 1024 // cfg.data.batch_size
    assert bool(saved["scaler"]) == (precision == "16-mixed")  # fp16 scales the loss, bf16 needs no scaler
