import gzip
import os
import struct
from pathlib import Path

# The suite runs two pytest workers, their CLI runs, spawned ranks and Ray's trial workers on 2 cores: many
# more compute threads than cores. OpenMP threads that spin while they wait for each other then burn the
# cores the others need (the smoke config's step took 0.44-1.5 s with libgomp's default ACTIVE wait policy
# beside a running suite, 0.22 s with PASSIVE). Set before torch loads libgomp; inherited by every process
# the tests start. Training speed on a machine of its own is measured in benchmarks/, without this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import trainrig

# processes the tests start (CLI runs, torchrun ranks, Ray's trial workers) import tests/faults.py too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)


def write_idx(path: Path, array: torch.Tensor, gz: bool = False) -> Path:
    """Write a uint8 tensor as an IDX file (the format FashionMNIST ships in)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


@pytest.fixture
def fake_fashion(tmp_path):
    """A tiny FashionMNIST-shaped dataset in IDX files: 64 train, 32 test images."""
    folder = tmp_path / "fashion"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    parts = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (64, 28, 28), generator=gen),
        "train-labels-idx1-ubyte": torch.arange(64) % 10,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (32, 28, 28), generator=gen),
        "t10k-labels-idx1-ubyte": torch.arange(32) % 10,
    }
    for i, (name, tensor) in enumerate(parts.items()):
        write_idx(folder / name, tensor, gz=i % 2 == 0)
    return folder, parts


TINY_NET = "model.class_path=user_models.TinyNet"  # tests about mechanics; RESNET for those about the ResNet
RESNET = "model.class_path=null"


@pytest.fixture
def tiny_cfg(tmp_path):
    """A seconds-long synthetic run writing into tmp_path: a two-conv network (user_models.TinyNet) unless the
    test asks for the ResNet18 (RESNET)."""
    def make(*overrides: str) -> trainrig.Config:
        base = ["data.name=synthetic", "data.synthetic_train=128", "data.synthetic_test=64",
                "data.batch_size=32", "data.eval_batch_size=64", "epochs=2", "threads=1",
                f"out_dir={tmp_path / 'runs'}", "name=tiny", "optim.name=adam", "sched.name=none", TINY_NET]
        return trainrig.load_config(None, base + list(overrides))
    return make


def assert_exit_2(result, message: str) -> None:
    """A CLI result that is bad input: exit code 2, ``message`` on one line, no traceback."""
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


# The slowest modules first: pytest-xdist (--dist loadfile) hands out whole modules in this order, so the
# two workers start on the long ones and finish together on the short ones.
SLOW_FIRST = ("test_ray", "test_tune_survival", "test_tune", "test_stalls", "test_faults", "test_fsdp", "test_compile",
              "test_own", "test_memory",
              "test_distributed", "test_loop", "test_honest", "test_trust", "test_notebook")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: order within a module kept
