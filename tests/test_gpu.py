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
