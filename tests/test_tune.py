"""Ray Tune search, run for real on CPU with tiny synthetic data."""
import csv
import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import trainrig
from trainrig.training import checkpoint
from trainrig.search import tune
from trainrig.cli import app
from trainrig.errors import ConfigError

from conftest import RESNET

runner = CliRunner()
SPACE = "{optim.lr: {loguniform: [1.0e-4, 3.0e-2]}, optim.name: {choice: [adam, sgd]}}"


def tune_cfg(tmp_path, *extra):
    return trainrig.load_config(None, [
        "data.name=synthetic", "data.synthetic_train=96", "data.synthetic_test=64", "data.batch_size=32",
        "epochs=4", f"tune.storage_path={tmp_path}", "tune.name=exp", f"tune.search_space={SPACE}",
        "tune.num_samples=4", "tune.n_initial_points=2", "tune.resources_per_trial.cpu=1",
        "model.class_path=user_models.TinyNet", *extra])  # the search's mechanics: a two-conv network


@pytest.mark.parametrize("space,message", [
    ("{optim.lr: {normal: [0, 1]}}", "tune.search_space.optim.lr: unknown distribution 'normal'"),
    ("{optim.lr: {uniform: [0.1, 0.01]}}", "tune.search_space.optim.lr: uniform needs lo < hi"),
    ("{optim.lr: {grid: [0.1, 0.01]}}", "tune.search_space.optim.lr: grid cannot be used with searcher: hyperopt"),
    ("{optim.lrr: {choice: [0.1]}}", "tune.search_space.optim.lrr: optim.lrr: unknown key; did you mean 'optim.lr'"),
    ("{model.finetune: {choice: [full, thawed]}}", "tune.search_space.model.finetune: model.finetune: expected one of"),
    ("{optim.lr: 0.1}", "tune.search_space.optim.lr: expected one distribution"),
])
def test_search_space_errors_name_the_key(tmp_path, space, message):
    cfg = tune_cfg(tmp_path, f"tune.search_space={space}")
    with pytest.raises(ConfigError) as exc:
        tune.validate_space(cfg)
    assert message in str(exc.value)


def test_cli_search_space_error_exit_2(tmp_path):
    result = runner.invoke(app, ["tune", "-c", "configs/smoke.yaml", "--set", f"tune.storage_path={tmp_path}",
                                 "--set", "tune.search_space={epochs: {randint: [5, 2]}}"])
    assert result.exit_code == 2
    assert "tune.search_space.epochs: randint needs lo < hi" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_space_conversion_and_params(tmp_path):
    cfg = tune_cfg(tmp_path, "tune.search_space={data.batch_size: {pow2: [4, 6]}, epochs: {randint: [2, 3]}}")
    space = tune.ray_space(tune.validate_space(cfg), "hyperopt")
    assert sorted(space["data.batch_size"].categories) == [16, 32, 64]
    assert (space["epochs"].lower, space["epochs"].upper) == (2, 4)  # inclusive 2..3
    applied = tune.apply_params(cfg, {"data.batch_size": 64, "optim.lr": 0.5})
    assert applied.data.batch_size == 64 and applied.optim.lr == 0.5 and applied.epochs == cfg.epochs


def test_optuna_asha_end_to_end(tmp_path):
    """Optuna's TPE (2 random trials first) with ASHA, 4 trials: trials.csv, the table, best.yaml warm-starts."""
    cfg = tune_cfg(tmp_path, "tune.searcher=optuna", "tune.scheduler=asha", "tune.max_t=4", "tune.grace_period=1",
                   "tune.reduction_factor=2", RESNET)  # trials that learn apart, and a warm start that shows
    result = tune.run(cfg, verbose=False)
    exp = result.experiment_dir
    rows = list(csv.DictReader(open(exp / "trials.csv")))
    assert len(rows) == 4
    epochs = [int(r["epochs_run"]) for r in rows]
    assert min(epochs) < 4 and max(epochs) == 4  # ASHA stopped at least one trial before max_t
    assert any(r["stop_reason"].startswith("stopped early by asha") for r in rows)
    assert (exp / "trials.png").read_bytes()[:4] == b"\x89PNG"
    from rich.console import Console

    from trainrig.cli import tune_table

    narrow = Console(width=80, record=True, file=open(os.devnull, "w"))
    narrow.print(tune_table(result))
    lines = narrow.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    body = [line for line in lines if line.startswith("│")]
    assert len(body) == 4 and all("asha stop" in line or " done" in line for line in body)  # a line each
    assert {line.split("│")[1].strip() for line in body} == {row["trial"].split("_")[2] + "_" + row["trial"].split("_")[3]
                                                            for row in rows}
    best = trainrig.load_config(exp / "best.yaml", [f"out_dir={tmp_path / 'runs'}", "epochs=1"])
    assert best.optim.lr == pytest.approx(result.best_params["optim.lr"])
    assert Path(best.model.weights).is_relative_to(exp) and Path(best.model.weights).name == "last.pt"
    # the warm start begins at the trial's accuracy: its weights are the trial's last ones ...
    assert trainrig.evaluate_checkpoint(best.model.weights)["test_acc"] == result.best_metrics["test_acc"]
    # ... and trains on from them: its first epoch's training loss is far below a start from scratch (test
    # accuracy after one more epoch on 96 images mostly shows BatchNorm's running statistics catching up)
    warm = trainrig.fit(best, progress="off").history[0]
    cold = trainrig.fit(dataclasses.replace(best, name="cold", model=dataclasses.replace(best.model, weights=None)),
                        progress="off").history[0]
    assert warm["train_loss"] < 0.75 * cold["train_loss"], (warm, cold)


def test_trials_with_strategy_ddp_run_as_ddp_groups(tmp_path, monkeypatch):
    """Each trial spawns 2 gloo ranks; rank 0's epochs reach Ray through the trial process (TuneReport).
    Every trial logs through the configured loggers; MLflow groups them in one experiment."""
    cfg = tune_cfg(tmp_path, "strategy=ddp", "devices=2", "epochs=1", "tune.searcher=random", "tune.num_samples=2",
                   "tune.resources_per_trial.cpu=2", "tune.search_space={optim.lr: {loguniform: [1.0e-4, 3.0e-2]}}",
                   "loggers=[csv, mlflow]")
    result = tune.run(cfg, verbose=False)
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(result.experiment_dir / "mlruns").as_uri())
    logged = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert sorted(r.info.run_name for r in logged) == sorted(t.name for t in result.experiment_dir.glob("_trial_*"))
    assert all(len(client.get_metric_history(r.info.run_id, "epoch_val_acc")) == 1 for r in logged)
    rows = list(csv.DictReader(open(result.experiment_dir / "trials.csv")))
    assert len(rows) == 2 and all(r["stop_reason"] == "completed" and r["epochs_run"] == "1" for r in rows)
    for trial in result.experiment_dir.glob("_trial_*"):
        ran = yaml.safe_load((trial / "fit" / "config.yaml").read_text())
        assert ran["strategy"] == "ddp" and ran["threads"] == 1  # 2 CPUs per trial shared by its 2 ranks
        assert len((trial / "fit" / "metrics.csv").read_text().splitlines()) == 2
        assert list(trial.glob("checkpoint_*/last.pt")), "Ray kept no checkpoint of the trial"
        assert ran["devices"] == 2


def test_trials_with_strategy_fsdp_run_sharded(tmp_path):
    """A trial that is a 2-rank FSDP group: Ray keeps its sharded checkpoint (the step file and its shard
    folder), and the best trial's shards are read once, on one process, for the search's test figure."""
    cfg = tune_cfg(tmp_path, "strategy=fsdp", "devices=2", "epochs=1", "tune.searcher=random", "tune.num_samples=1",
                   "tune.resources_per_trial.cpu=2", "tune.search_space={optim.lr: {loguniform: [1.0e-4, 3.0e-2]}}")
    result = tune.run(cfg, verbose=False)
    rows = list(csv.DictReader(open(result.experiment_dir / "trials.csv")))
    assert len(rows) == 1 and rows[0]["stop_reason"] == "completed" and float(rows[0]["test_acc"]) >= 0
    trial = next(result.experiment_dir.glob("_trial_*"))
    assert yaml.safe_load((trial / "fit" / "config.yaml").read_text())["strategy"] == "fsdp"
    kept = next(trial.glob("checkpoint_*/last.pt"))
    shards = kept.parent / checkpoint.load(kept, mmap=True)[checkpoint.SHARDS]
    assert len(list(shards.glob("*.distcp"))) == 2
    assert result.best_metrics["test_acc"] == float(rows[0]["test_acc"])


def test_refuses_to_overwrite_and_needs_experiment_for_resume(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "trials.csv").write_text("x")
    with pytest.raises(ConfigError, match="already holds an experiment"):
        tune.run(tune_cfg(tmp_path))
    with pytest.raises(ConfigError, match="no experiment at"):
        tune.run(tune_cfg(tmp_path, "tune.name=other"), resume=True)


def test_asha_and_best_yaml_never_read_the_test_set(tmp_path):
    """The same ASHA search twice, the second time with the test labels permuted: the same trials are cut at
    the same rungs and the same best.yaml is chosen (one trial at a time, so ASHA's rungs see the same order);
    the best trial's test accuracy is measured once, after the choice. The trials hold out the same
    validation images (hashed)."""
    from test_honest import fashion_files

    outcomes = []
    for name, permute in (("plain", False), ("permuted", True)):
        root = fashion_files(tmp_path / f"data-{name}", permute)
        cfg = tune_cfg(tmp_path, "data.name=fashion_mnist", f"data.root={root}", "tune.scheduler=asha",
                       "tune.searcher=random", "tune.max_concurrent=1", "epochs=3", "tune.max_t=3",
                       "tune.grace_period=1", "tune.reduction_factor=2", f"tune.name={name}", "tune.num_samples=5",
                       "tune.search_space={optim.lr: {loguniform: [1.0e-3, 5.0e-2]}}",
                       f"callbacks=[{{class_path: faults.SplitPrints, init_args: {{folder: '{tmp_path}'}}}}]")
        result = tune.run(cfg, verbose=False)
        rows = sorted((r["param:optim.lr"], r["epochs_run"], r["stop_reason"],
                       r["final_val_acc"], r["test_acc"] != "") for r in csv.DictReader(open(
                           result.experiment_dir / "trials.csv")))
        best = yaml.safe_load((result.experiment_dir / "best.yaml").read_text())
        outcomes.append((rows, result.best_params, best["optim"], best["epochs"], result.best_metrics))
    (rows_a, params_a, optim_a, epochs_a, metrics_a), (rows_b, params_b, optim_b, epochs_b, metrics_b) = outcomes
    assert any(r[2].startswith("stopped early by asha") for r in rows_a), rows_a  # ASHA did cut trials ...
    assert rows_a == rows_b and params_a == params_b  # ... the same ones, at the same rungs
    assert optim_a == optim_b and epochs_a == epochs_b and metrics_a["val_acc"] == metrics_b["val_acc"]
    assert sum(r[4] for r in rows_a) == 1  # one test figure: the best trial's
    assert metrics_a["test_acc"] is not None and metrics_b["test_acc"] is not None
    prints = {line for line in (tmp_path / "splits-rank0.txt").read_text().splitlines()}
    assert len((tmp_path / "splits-rank0.txt").read_text().splitlines()) == 10 and len(prints) == 2  # 1 per data
