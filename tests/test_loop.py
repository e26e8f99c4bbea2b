import csv
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

import trainrig
from trainrig import checkpoint, loop
from trainrig.cli import app
from trainrig.config import SchedConfig
from trainrig.errors import CheckpointError

runner = CliRunner()


def test_loss_falls_and_run_folder_complete(tiny_cfg):
    result = trainrig.fit(tiny_cfg("epochs=4", "data.synthetic_train=256"), progress="off")
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.2 * losses[0]
    # 10 classes: chance is 0.1; BatchNorm's running stats need ~30 steps before eval mode agrees
    assert result.history[-1]["test_acc"] > 0.5
    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s",
                            "seconds"}
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in result.history:  # history holds plain floats, never tensors that could pin a graph
        assert all(isinstance(v, (int, float)) for v in row.values())


def test_resume_equals_uninterrupted(tiny_cfg):
    full = trainrig.fit(tiny_cfg("epochs=3", "name=full", "data.flip=true", "sched.name=cosine"), progress="off")
    part_cfg = tiny_cfg("epochs=3", "name=part", "data.flip=true", "sched.name=cosine")

    class Interrupted(Exception):
        pass

    def stop_after_two(row, run_dir):
        if row["epoch"] == 2:
            raise Interrupted
    with pytest.raises(Interrupted):
        trainrig.fit(part_cfg, progress="off", on_epoch=stop_after_two)
    resumed = trainrig.fit(part_cfg, resume=True, progress="off")
    a = checkpoint.load(full.run_dir / "checkpoints" / "last.pt")
    b = checkpoint.load(resumed.run_dir / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # bitwise, on CPU
    assert [r["test_acc"] for r in full.history] == [r["test_acc"] for r in resumed.history]


def test_existing_run_is_never_overwritten(tiny_cfg):
    first = trainrig.fit(tiny_cfg("epochs=1"), progress="off")
    stamp = (first.run_dir / "checkpoints" / "last.pt").read_bytes()
    second = trainrig.fit(tiny_cfg("epochs=1"), progress="off")
    assert second.run_dir != first.run_dir and second.run_dir.name == "tiny-2"
    assert (first.run_dir / "checkpoints" / "last.pt").read_bytes() == stamp
    assert yaml.safe_load((second.run_dir / "config.yaml").read_text())["name"] == "tiny-2"


def test_resume_without_checkpoint_is_clear(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        trainrig.fit(tiny_cfg("name=never"), resume=True, progress="off")


def test_cli_set_lands_in_saved_config_and_eval(tmp_path):
    out = tmp_path / "runs"
    result = runner.invoke(app, ["fit", "--config", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={out}",
                                 "--set", "epochs=1", "--set", "optim.lr=0.0042", "--set", "data.synthetic_train=96"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "smoke" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.0042 and saved["epochs"] == 1 and saved["data"]["synthetic_train"] == 96
    assert "best test accuracy" in result.output
    again = trainrig.load_config(out / "smoke" / "config.yaml")  # the saved file alone reproduces the run
    assert again.optim.lr == 0.0042
    ev = runner.invoke(app, ["eval", "--checkpoint", str(out / "smoke" / "checkpoints" / "last.pt")])
    assert ev.exit_code == 0, ev.output
    acc = float(ev.output.split("test accuracy ")[1].split("%")[0])
    metrics = list(csv.DictReader(open(out / "smoke" / "metrics.csv")))
    assert acc == pytest.approx(100 * float(metrics[-1]["test_acc"]), abs=0.01)


def test_cli_eval_bad_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_text("not a checkpoint")
    result = runner.invoke(app, ["eval", "--checkpoint", str(bad)])
    assert result.exit_code == 2 and "not a readable checkpoint" in result.output
    assert "Traceback" not in result.output


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"a": torch.ones(2)})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        checkpoint.save(path, {"a": Boom()})
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


@pytest.mark.parametrize("name", ["none", "cosine", "step", "onecycle"])
def test_schedules(name):
    c = SchedConfig(name=name, warmup_epochs=1, step_size=2, gamma=0.5)
    f = loop.lr_factor_fn(c, epochs=4, steps_per_epoch=10)
    values = [f(s) for s in range(40)]
    assert all(0 <= v <= 1.0 + 1e-9 for v in values)
    if name == "none":
        assert set(values) == {1.0}
    if name == "cosine":
        assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[-1] < 0.01
    if name == "step":
        assert values[19] == 1.0 and values[20] == 0.5
    if name == "onecycle":
        assert values[0] == pytest.approx(1 / 25) and max(values) == pytest.approx(1.0) and values[-1] < 0.01
        assert math.isclose(max(values), values[10], rel_tol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gradual_unfreezing_trains_with_each_optimizer(tiny_cfg, optimizer):
    """Parameters that start getting gradients mid-run (gradual) must not break the optimizer."""
    result = trainrig.fit(tiny_cfg("epochs=3", "model.finetune=gradual", f"optim.name={optimizer}",
                                   "data.synthetic_train=64"), progress="off")
    assert len(result.history) == 3
