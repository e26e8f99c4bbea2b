"""Experiment tracking: what each logger writes, read back with the tool's own reader."""
import csv
import json
import struct

import pytest

import trainrig
from trainrig.tracking import loggers
from trainrig.errors import ConfigError

ALL = "loggers=[csv, tensorboard, mlflow, wandb]"


def wandb_history(run_dir):
    """History rows of the offline W&B run in run_dir/wandb, from its .wandb file (a LevelDB-style log of
    protobuf records, read with wandb's own protobuf classes)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw, pos, block, pending, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Two DDP ranks, every logger: rank 0 alone logs."""
    tmp = tmp_path_factory.mktemp("tracking")
    cfg = trainrig.load_config(None, [
        "data.name=synthetic", "data.synthetic_train=128", "data.synthetic_test=64", "data.batch_size=32",
        "epochs=2", "threads=1", f"out_dir={tmp}", "name=tracked", "optim.name=adam", ALL, "log_every_n_steps=2",
        "strategy=ddp", "devices=2", "model.class_path=user_models.TinyNet"])
    return trainrig.fit(cfg, progress="off"), tmp


def test_tensorboard_event_files(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = logged
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "epoch/val_acc", "epoch/train_loss"} <= set(scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]  # 4 steps per epoch, every 2nd
    assert [round(e.value, 6) for e in acc.Scalars("epoch/val_acc")] == [round(r["val_acc"], 6) for r in result.history]
    assert "curves" in acc.Tags()["images"]
    assert len(list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only


def test_mlflow_run_params_metrics_artifacts(logged, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in for its file store

    result, tmp = logged
    client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])  # one, not per rank
    assert run.data.params["optim.name"] == "adam" and run.data.params["epochs"] == "2"
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    history = client.get_metric_history(run.info.run_id, "epoch_val_acc")
    assert [m.value for m in history] == pytest.approx([r["val_acc"] for r in result.history])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4, 6, 8]
    files = {f.path for f in client.list_artifacts(run.info.run_id)} | \
        {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"config.yaml", "curves.png", "checkpoints/best.pt"} <= files


def test_wandb_offline_run_history(logged):
    result, _ = logged
    rows = wandb_history(result.run_dir)
    epochs = [r for r in rows if "epoch/val_acc" in r]
    assert [r["epoch/val_acc"] for r in epochs] == pytest.approx([r["val_acc"] for r in result.history])
    assert [r["_step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]


def test_csv_steps_and_metrics(logged):
    result, _ = logged
    steps = list(csv.DictReader((result.run_dir / "steps.csv").open()))
    assert [int(r["step"]) for r in steps] == [2, 4, 6, 8] and float(steps[0]["lr"]) > 0
    assert len(list(csv.DictReader((result.run_dir / "metrics.csv").open()))) == 2


def test_missing_logger_package_is_named_before_training(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(loggers.PACKAGES, "wandb", ("wandb_that_is_not_installed", "wandb"))
    with pytest.raises(ConfigError, match=r"loggers: wandb needs the 'wandb_that_is_not_installed' package "
                                          r"\(pip install 'trainrig\[wandb\]'\)"):
        trainrig.fit(tiny_cfg("loggers=[csv, wandb]"), progress="off")
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_trainer_runs_compares_folders(tiny_cfg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from trainrig import cli
    from trainrig.cli import app

    monkeypatch.setattr(cli.out, "width", 160)  # a wide terminal: one line per run

    trainrig.fit(tiny_cfg("name=a", "epochs=1"), progress="off")
    trainrig.fit(tiny_cfg("name=b", "epochs=1", "optim.lr=0.01"), progress="off")
    crash = "callbacks=[{class_path: faults.FailOnRank, init_args: {rank: 0, epoch: 1}}]"
    with pytest.raises(RuntimeError, match="injected failure"):
        trainrig.fit(tiny_cfg("name=c", "optim.lr=0.003", crash), progress="off")
    from trainrig.tracking import runs

    summaries = runs.compare(tmp_path / "runs", sort="name")
    assert [s.name for s in summaries] == ["a", "b", "c"]
    assert [s.status for s in summaries] == ["done", "done", "interrupted (1/2)"]
    assert runs.differing(summaries) == ["epochs", "optim.lr", "callbacks"]
    assert summaries[1].best_acc == summaries[1].history[0]["val_acc"] and summaries[2].best_epoch == 1
    res = CliRunner().invoke(app, ["runs", str(tmp_path / "runs"), "--last", "2", "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    rows = [line.split("│")[1:-1] for line in res.output.splitlines() if line.startswith("│")]
    assert [r[0].strip() for r in rows] == ["b", "c"]  # --last 2, by start time
    assert "1/2 interrupted" in rows[1][2] and rows[1][-2].strip() == "0.003"  # epochs, then optim.lr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
