"""launcher: ray - DDP and FSDP fits as Ray Train workers on a real local Ray cluster (`ray start --head`, 2 CPUs,
one for the module's tests)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainrig
from trainrig.training import checkpoint
from trainrig.parallel.launch import free_port

pytestmark = pytest.mark.cluster  # ~2 min of a 2-core machine: its own tier, so make test stays under 8 min

DDP = ["strategy=ddp", "devices=2", "threads=1", "data.synthetic_train=128", "data.synthetic_test=64",
       "data.batch_size=32", "data.flip=true", "epochs=2", "checkpoint.every_n_steps=2"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node of 2 CPUs, as `ray start --head` makes one, on its own port (a Ray another test runs at
    the same time must not be found instead): its address. Ended as a process group, not by `ray stop`,
    which would end every Ray on the machine."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # a test cluster
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--port", address.split(":")[1], "--num-cpus", "2",
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def ready() -> None:  # the test does its own work meanwhile
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Ray runtime started" in log.read_text(), log.read_text()[-2000:]
    try:
        yield env, address, ready
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=1)  # `ray start --block` takes ~30 s to stop on SIGTERM: a test cluster need not
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_ray_workers_train_like_spawned_ddp_and_survive_a_killed_worker(tiny_cfg, tmp_path, ray_cluster):
    """The same config with launcher: ray on the cluster: rank 1's Ray worker is SIGKILLed after step 3,
    Ray restarts the group (ray.max_failures: 1), it resumes from the step-2 checkpoint, and the run ends
    with the weights and metrics of spawned DDP on the same global batches."""
    spawned = trainrig.fit(tiny_cfg(*DDP, "name=spawned"), progress="off")
    marker = tmp_path / "killed.txt"
    kill = f"callbacks=[{{class_path: faults.KillOnce, init_args: {{rank: 1, step: 3, marker: '{marker}'}}}}]"
    config = tmp_path / "ray.yaml"
    env, address, ready = ray_cluster
    ready()
    config.write_text(trainrig.config.dump(tiny_cfg(*DDP, "name=onray", "launcher=ray", f"ray.address={address}",
                                                    "ray.num_workers=2", "ray.max_failures=1", kill)))
    proc = subprocess.run([sys.executable, "-m", "trainrig", "fit", "-c", str(config)], capture_output=True,
                          text=True, timeout=400, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert marker.is_file(), "the Ray worker was never killed"
    assert "resumed epoch 1 at batch 2" in proc.stdout + proc.stderr
    run = spawned.run_dir.parent / "onray"
    a = checkpoint.load(spawned.run_dir / "checkpoints" / "last.pt")
    b = checkpoint.load(run / "checkpoints" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]
    assert "test accuracy of its checkpoint" in proc.stdout  # the driver renders rank 0's result as a local run does


def test_ray_workers_train_fsdp_like_one_process(tiny_cfg, tmp_path, ray_cluster):
    """strategy: fsdp on Ray Train's workers (float64, a network without BatchNorm): every worker writes its
    shard of each checkpoint, and the weights equal one process computing the same global batches (the
    reference of tests/test_distributed.py, atol 1e-10)."""
    from test_distributed import F64, reference_params

    fsdp = [*DDP, "strategy=fsdp", "epochs=1", "checkpoint.every_n_steps=null", F64,
            "model.class_path=user_models.NoNormNet"]
    env, address, ready = ray_cluster
    ready()
    cfg = tiny_cfg(*fsdp, "name=onray", "launcher=ray", f"ray.address={address}", "ray.num_workers=2")
    config = tmp_path / "ray.yaml"
    config.write_text(trainrig.config.dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "trainrig", "fit", "-c", str(config)], capture_output=True,
                          text=True, timeout=400, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run = Path(cfg.out_dir) / "onray"
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    assert saved[checkpoint.SHARDS] and len(list((run / "checkpoints" / saved[checkpoint.SHARDS]).glob("*.distcp"))) == 2
    for key, value in reference_params(cfg).items():
        assert torch.allclose(saved["model"][key], value, rtol=0, atol=1e-10), key
