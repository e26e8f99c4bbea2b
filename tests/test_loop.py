import csv
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

import trainrig
from trainrig.training import checkpoint, optim
from trainrig.cli import app
from trainrig.config import SchedConfig
from trainrig.errors import CheckpointError

from conftest import RESNET, assert_exit_2

runner = CliRunner()


def test_loss_falls_and_run_folder_complete(tiny_cfg):
    result = trainrig.fit(tiny_cfg("epochs=4", "data.synthetic_train=256", RESNET), progress="off")
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.3 * losses[0]
    # 10 classes: chance is 0.1; BatchNorm's running stats need ~30 steps before eval mode agrees
    assert result.best_val_acc > 0.3 and result.test_acc > 0.3  # best.pt, chosen on 26 validation images
    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt",
                 "eval.json", "confusion.png", "mistakes.png", "report.html"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s",
                            "seconds"}  # no test column: the test set is read once, at the end
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in result.history:  # history holds plain floats, never tensors that could pin a graph
        assert all(isinstance(v, (int, float)) for v in row.values())


def test_resume_refuses_a_changed_recipe_but_lets_epochs_grow(tiny_cfg, tmp_path):
    first = trainrig.fit(tiny_cfg("epochs=1"), progress="off")
    stamp = (first.run_dir / "config.yaml").read_text()
    out = str(tmp_path / "runs")
    result = runner.invoke(app, ["fit", "-c", str(first.run_dir / "config.yaml"), "--resume", "--quiet",
                                 "--set", "optim.lr=0.5", "--set", "data.flip=true"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "optim.lr=0.5 (trained with 0.001)" in message and "data.flip=True (trained with False)" in message
    assert "Traceback" not in result.output
    assert (first.run_dir / "config.yaml").read_text() == stamp  # the run's recipe file is untouched
    longer = runner.invoke(app, ["fit", "-c", str(first.run_dir / "config.yaml"), "--resume", "--quiet",
                                 "--set", "epochs=2", "--set", f"out_dir={out}"])
    assert longer.exit_code == 0, longer.output
    assert [int(r["epoch"]) for r in csv.DictReader(open(first.run_dir / "metrics.csv"))] == [1, 2]


def test_callbacks_called_in_order_with_the_rows(tiny_cfg):
    from faults import Recorder

    recorder = Recorder()
    result = trainrig.fit(tiny_cfg("epochs=2"), progress="off", callbacks=[recorder])
    lines = [line for line in recorder.lines if not line.startswith("message")]
    assert any(line.startswith("message run folder:") for line in recorder.lines)
    batches = [f"batch {i}" for i in range(1, 128 // 32 + 1)]
    expected = ["fit_start", "epoch_start 1 4", *batches, "epoch_end 1", "epoch_start 2 4", *batches, "epoch_end 2",
                "fit_end"]
    assert [" ".join(line.split()[:2]) if line.split()[0] in ("batch", "epoch_end") else line
            for line in lines] == expected
    for epoch, row in enumerate(result.history, 1):
        end = next(line for line in lines if line.startswith(f"epoch_end {epoch} "))
        assert end == f"epoch_end {epoch} {row['train_loss']:.6f} {row['val_acc']:.6f}"
    # the metrics.csv and checkpoint callbacks ran before the user's epoch_end
    assert (result.run_dir / "checkpoints" / "last.pt").is_file()


def test_user_callback_from_a_notebook_style_script(tmp_path):
    """What a notebook cell does: a callback class defined in __main__, passed to fit."""
    script = tmp_path / "notebook.py"
    script.write_text(
        "import trainrig\n"
        "class Collect(trainrig.Callback):\n"
        "    def __init__(self):\n"
        "        self.accs = []\n"
        "    def on_epoch_end(self, run, row):\n"
        "        self.accs.append(row['val_acc'])\n"
        f"cfg = trainrig.load_config('configs/smoke.yaml', ['epochs=2', 'out_dir={tmp_path}', 'threads=1',\n"
        "                                                   'data.synthetic_train=64'])\n"
        "collect = Collect()\n"
        "result = trainrig.fit(cfg, progress='off', callbacks=[collect])\n"
        "assert collect.accs == [r['val_acc'] for r in result.history], collect.accs\n"
        "print('accs', len(collect.accs))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accs 2" in proc.stdout


def test_existing_run_is_never_overwritten(tiny_cfg):
    first = trainrig.fit(tiny_cfg("epochs=1"), progress="off")
    stamp = (first.run_dir / "checkpoints" / "last.pt").read_bytes()
    second = trainrig.fit(tiny_cfg("epochs=1"), progress="off")
    assert second.run_dir != first.run_dir and second.run_dir.name == "tiny-2"
    assert (first.run_dir / "checkpoints" / "last.pt").read_bytes() == stamp
    assert yaml.safe_load((second.run_dir / "config.yaml").read_text())["name"] == "tiny-2"


def test_resume_without_checkpoint_is_clear(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        trainrig.fit(tiny_cfg("name=never"), resume=True, progress="off")


def test_cli_set_lands_in_saved_config_and_eval(tmp_path):
    out = tmp_path / "runs"
    result = runner.invoke(app, ["fit", "--config", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={out}",
                                 "--set", "epochs=1", "--set", "optim.lr=0.0042", "--set", "data.synthetic_train=96"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "smoke" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.0042 and saved["epochs"] == 1 and saved["data"]["synthetic_train"] == 96
    assert "test accuracy of its checkpoint" in result.output
    again = trainrig.load_config(out / "smoke" / "config.yaml")  # the saved file alone reproduces the run
    assert again.optim.lr == 0.0042
    ev = runner.invoke(app, ["eval", "--checkpoint", str(out / "smoke" / "checkpoints" / "last.pt")])
    assert ev.exit_code == 0, ev.output
    acc = float(ev.output.split("test accuracy ")[1].split("%")[0])
    metrics = list(csv.DictReader(open(out / "smoke" / "metrics.csv")))
    assert acc == pytest.approx(100 * json.loads((out / "smoke" / "eval-last" / "eval.json").read_text())["accuracy"],
                                abs=0.01)
    assert len(metrics) == 1


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
    f = optim.lr_factor_fn(c, epochs=4, steps_per_epoch=10)
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


BAD_CALLBACKS = {  # spec -> the one-line error
    "[{class_path: nowhere.Nothing}]": "callbacks[0].class_path: cannot import nowhere.Nothing",
    "[{class_path: trainrig.config.Config}]": "callbacks[0].class_path: trainrig.config.Config is not a",
    "[{class_path: faults.Recorder, init_args: {colour: red}}]": "callbacks[0].init_args:",
    "[{path: faults.Recorder}]": "callbacks[0]: expected {class_path: package.module.Class",
}


@pytest.mark.parametrize("spec,message", BAD_CALLBACKS.items())
def test_bad_callback_spec_exit_2(tmp_path, spec, message):
    assert_exit_2(runner.invoke(app, ["fit", "-c", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={tmp_path}",
                                       "--set", f"callbacks={spec}"]), message)
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def test_resume_auto_starts_then_continues_in_the_same_folder(tmp_path):
    """One command for the first launch and every restart: '--resume auto' (or resume: auto in the config)."""
    base = ["fit", "-c", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={tmp_path}", "--set", "name=job",
            "--set", "data.synthetic_train=128", "--set", "threads=1"]
    (tmp_path / "job").mkdir(parents=True)
    (tmp_path / "job" / "config.yaml").write_text("# a launch that died before its first checkpoint\n")
    first = runner.invoke(app, [*base, "--set", "epochs=1", "--resume", "auto"])
    assert first.exit_code == 0, first.output
    assert not (tmp_path / "job-2").exists()  # no checkpoint there: started in that folder
    again = runner.invoke(app, [*base, "--set", "epochs=2", "--set", "resume=auto"])
    assert again.exit_code == 0, again.output
    history = torch.load(tmp_path / "job" / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert [r["epoch"] for r in history] == [1, 2]  # resumed after epoch 1, not retrained
    assert_exit_2(runner.invoke(app, [*base, "--resume", "later"]), "unexpected argument 'later'")
    assert_exit_2(runner.invoke(app, [*base, "--set", "name=none", "--resume"]), "--resume: no checkpoint in")
