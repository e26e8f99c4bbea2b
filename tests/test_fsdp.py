"""strategy: fsdp (FSDP2, fully_shard) on 2 gloo CPU processes: the same computation as one process, sharded
checkpoints that resume exactly after a killed rank and at another world size, and a sharded run used by
predict / export / --init-from on one process."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import trainrig
from trainrig import models
from trainrig.training import checkpoint

from test_distributed import DDP, F64, reference_params
from test_faults import assert_same_run

FSDP = [*DDP, "strategy=fsdp"]


def test_fsdp_equals_single_process_and_serves_one_process(tiny_cfg, tmp_path):
    """2 epochs in float64, flips on (each rank its own stream): the weights equal one process computing the
    same per-rank micro-batches and averaging their gradients (atol 1e-10); every rank wrote its shard.
    A network without BatchNorm: a conv bias just before BatchNorm has a gradient of pure rounding noise, which
    Adam scales up to full steps, so FSDP's (a + b) / 2 against the reference's a / 2 + b / 2 would move it by
    4e-10 (every other parameter of TinyNet agrees within 5e-13). Its best.pt then serves predict, export and
    --init-from on one process (below)."""
    cfg = tiny_cfg(*FSDP, "epochs=2", F64, "data.flip=true", "model.class_path=user_models.NoNormNet")
    result = trainrig.fit(cfg, progress="off")
    assert len(result.param_checksums) == 2 and result.param_checksums[0] == result.param_checksums[1]
    folder = result.run_dir / "checkpoints"
    saved = checkpoint.load(folder / "last.pt")
    assert saved[checkpoint.SHARDS] and "optimizer" not in saved  # the small step file names its shards
    shards = folder / saved[checkpoint.SHARDS]
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    named = {checkpoint.load(p, mmap=True)[checkpoint.SHARDS] for p in folder.glob("*.pt")}
    assert {p.name for p in folder.glob("*.dcp")} == named  # shard folders are pruned with their step files
    expected = reference_params(cfg)
    for name, value in expected.items():
        assert saved["model"][name].dtype == torch.float64
        assert torch.allclose(saved["model"][name], value, rtol=0, atol=1e-10), name
    assert result.test["samples"] == 101  # the final test read the chosen shards on both ranks
    _one_process_uses(result.run_dir / "checkpoints" / "best.pt", tmp_path)


def test_fsdp_killed_rank_restarts_and_equals_uninterrupted(tiny_cfg, tmp_path):
    """Rank 1 is SIGKILLed after step 3, one step past a mid-epoch sharded save; the group restarts
    (restarts: 1), each rank reads its shard of the step-2 checkpoint, and the run ends bitwise equal to the
    uninterrupted one (weights and every epoch's metrics)."""
    full = trainrig.fit(tiny_cfg(*FSDP, "name=full", "checkpoint.every_n_steps=2"), progress="off")
    marker = tmp_path / "killed.txt"
    kill = f"callbacks=[{{class_path: faults.KillOnce, init_args: {{rank: 1, step: 3, marker: '{marker}'}}}}]"
    killed = trainrig.fit(tiny_cfg(*FSDP, "name=killed", "checkpoint.every_n_steps=2", "restarts=1", kill),
                          progress="off")
    assert marker.is_file() and killed.run_dir.name == "killed"
    assert_same_run(full, killed.run_dir)
    assert not list((killed.run_dir / "checkpoints").glob(".*.tmp"))


# no BatchNorm and no validation split (115 training images would pad differently over 1 and 2 ranks): the
# step then depends only on the global batch, whatever the number of ranks sharing it
WORLDS = [*FSDP, F64, "model.class_path=user_models.NoNormNet", "data.val_fraction=0", "checkpoint.monitor=last",
          "data.synthetic_train=128"]


def test_fsdp_run_resumes_on_one_process_and_on_two_alike(tiny_cfg):
    """A 2-rank run's epoch-1 shards, resumed for epoch 2 by 1 process and by 2: the same weights (float64,
    atol 1e-10; the reshard is exact, only the gradient sum's order differs)."""
    first = trainrig.fit(tiny_cfg(*WORLDS, "epochs=1", "name=one"), progress="off")
    ends = {}
    for world in (1, 2):
        name = f"world{world}"
        shutil.copytree(first.run_dir, first.run_dir.parent / name)
        resumed = trainrig.fit(tiny_cfg(*WORLDS, "epochs=2", f"name={name}", f"devices={world}"), resume=True,
                               progress="off")
        assert len(resumed.history) == 2 and len(resumed.param_checksums) == world
        ends[world] = checkpoint.load(resumed.run_dir / "checkpoints" / "last.pt")["model"]
    start = checkpoint.load(first.run_dir / "checkpoints" / "last.pt")["model"]
    for key, value in ends[2].items():
        assert not torch.equal(value, start[key]), key  # epoch 2 trained
        assert torch.allclose(ends[1][key], value, rtol=0, atol=1e-10), key


@pytest.mark.parametrize("key,value,message", [
    ("model.ema.decay", "0.99", "model.ema: not with strategy fsdp"),
    ("precision", "16-mixed", "precision: 16-mixed needs a loss scaler"),
])
def test_what_fsdp_cannot_do_is_one_line(tiny_cfg, key, value, message):
    with pytest.raises(trainrig.ConfigError, match=message):
        trainrig.fit(tiny_cfg(*FSDP, f"{key}={value}"), progress="off")


def _images(folder, n=6):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    return folder


def _one_process_uses(sharded, tmp_path):
    """A 2-rank FSDP run's best.pt (a step file naming its shards) serves predict, export and --init-from on
    one process exactly as a whole-model checkpoint of the same weights does."""
    whole = {k: v for k, v in checkpoint.load(sharded).items() if k != checkpoint.SHARDS}
    plain = tmp_path / "plain.pt"
    checkpoint.save(plain, whole)
    images = _images(tmp_path / "images")
    a = trainrig.predict(sharded, [images], trust_class_path=True)
    b = trainrig.predict(plain, [images], trust_class_path=True)
    assert [(p.labels, p.probabilities) for p in a] == [(p.labels, p.probabilities) for p in b]
    exported = [trainrig.export(path, "torchscript", tmp_path / f"{path.stem}.ts", trust_class_path=True)
                for path in (sharded, plain)]
    assert all(e.max_abs_diff < 1e-5 for e in exported)
    x = torch.randn(4, 1, 28, 28)
    ts = [torch.jit.load(str(e.path)) for e in exported]
    assert torch.equal(ts[0](x), ts[1](x))
    init = models.load_state_dict_file(sharded)  # what model.weights / --init-from read: tensors only
    assert init.keys() == whole["model"].keys()
    assert all(torch.equal(init[k], whole["model"][k]) for k in init)
