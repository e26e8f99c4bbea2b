from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from trainrig import config
from trainrig.config import reference
from trainrig.cli import app
from trainrig.errors import ConfigError

from conftest import assert_exit_2

runner = CliRunner()
SHIPPED = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_types(tmp_path):
    cfg = config.load(write(tmp_path, "optim:\n  lr: 1e-3\n  name: sgd\nepochs: 3\n"))
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as str
    assert cfg.optim.name == "sgd" and cfg.epochs == 3
    assert cfg.data.batch_size == config.DataConfig().batch_size


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = config.load(path)
    assert cfg.name and cfg.epochs >= 1


def test_unknown_key_names_key_and_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean 'optim\.lr'"):
        config.load(write(tmp_path, "optim:\n  lrr: 0.1\n"))


def test_all_problems_collected(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, "epochs: many\noptim:\n  lr: -1\ndata:\n  batchsize: 3\n"))
    msg = str(exc.value)
    assert "epochs: expected an integer, got 'many'" in msg
    assert "optim.lr: expected a value > 0.0, got -1.0" in msg
    assert "did you mean 'data.batch_size'" in msg


def test_bad_choice_names_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.name: expected one of 'adam', 'adamw', 'sgd', got 'rmsprop'"):
        config.load(write(tmp_path, "optim:\n  name: rmsprop\n"))


def test_set_overrides_are_typed():
    cfg = config.load(None, ["optim.lr=3e-4", "data.flip=true", "data.subset=100", "model.weights=null"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.flip is True and cfg.data.subset == 100 and cfg.model.weights is None
    with pytest.raises(ConfigError, match="--set: epochs: expected an integer, got 'big'"):
        config.load(None, ["epochs=big"])
    with pytest.raises(ConfigError, match="--set: data.batch_size: expected int or one of 'auto', got 'big'"):
        config.load(None, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load(None, ["optim.lr"])


def test_dump_round_trips(tmp_path):
    cfg = config.load(SHIPPED[0], ["optim.lr=0.05", "data.subset=10"])
    again = config.load(write(tmp_path, config.dump(cfg)))
    assert again == cfg


def test_every_field_has_help():
    rows = reference.describe()
    assert len(rows) > 30
    assert all(help_text for _, _, _, help_text in rows)


def test_docs_config_reference_is_generated_from_the_schema():
    page = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert page == reference.markdown_reference(), "docs/config.md is stale: run make docs"
    assert all(f"| `{key}` |" in page for key, *_ in reference.describe())
    shown = runner.invoke(app, ["config", "keys", "--markdown"])
    assert shown.exit_code == 0 and shown.output == page


@pytest.mark.parametrize("yaml_text,expected", [
    ("optimm:\n  lr: 1\n", "optimm: unknown key; did you mean 'optim'"),
    ("epochs: 1.5\n", "epochs: expected an integer, got 1.5"),
    ("data:\n  batch_size: 0\n", "data.batch_size: expected a value >= 1, got 0"),
    ("[1, 2]\n", "expected a mapping of config keys"),
])
def test_cli_bad_config_exit_2_one_line(tmp_path, yaml_text, expected):
    assert_exit_2(runner.invoke(app, ["config", "show", "--config", str(write(tmp_path, yaml_text))]), expected)


def test_cli_missing_file_and_bad_set(tmp_path):
    result = runner.invoke(app, ["fit", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output
    result = runner.invoke(app, ["fit", "--set", "optim.lr=fast"])
    assert result.exit_code == 2 and "optim.lr: expected a number, got 'fast'" in result.output


def test_cli_config_show_applies_set():
    result = runner.invoke(app, ["config", "show", "--set", "optim.lr=0.25", "--set", "epochs=7"])
    assert result.exit_code == 0
    shown = yaml.safe_load(result.output)
    assert shown["optim"]["lr"] == 0.25 and shown["epochs"] == 7


@pytest.mark.parametrize("setup,args,expected", [
    (lambda p: p.write_bytes(bytes(range(256)) * 2), ["-c", "{f}"], "{f}: not a text file (a YAML config is expected)"),
    (lambda p: p.write_text("epochs: 1\nseed: 3\nepochs: 2\n"), ["-c", "{f}"],
     "{f} (line 3): not valid YAML: key 'epochs' is given twice (lines 1 and 3)"),
    (lambda p: p.write_text("optim:\n  lr: .nan\n"), ["-c", "{f}"], "{f}: optim.lr: expected a finite number, got nan"),
    (lambda p: p.mkdir(), ["-c", "{f}"], "{f}: is a folder, not a config file"),
    (lambda p: None, ["--set", "optim.lr=inf"], "--set: optim.lr: expected a finite number, got 'inf'"),
    (lambda p: None, ["--set", "seed=-1"], "--set: seed: expected a value >= 0, got -1"),
    (lambda p: None, ["--set", "name=../elsewhere"], "name: expected a plain folder name"),
    (lambda p: None, ["--set", "tune.search_space={{a: 1, a: 2}}"], "key 'a' is given twice"),
    (lambda p: p.write_text("x"), ["--set", "out_dir={f}", "--set", "epochs=1"], "out_dir={f}: is a file, not a folder"),
], ids=["binary", "duplicate-key", "nan", "folder", "inf", "negative-seed", "name-path", "dup-set", "out_dir-file"])
def test_bad_input_a_new_user_tries(tmp_path, setup, args, expected):
    """Each was a traceback (exit 1) or silently accepted before: now one line, exit 2, nothing written."""
    target = tmp_path / "thing"
    setup(target)
    command = "fit" if "out_dir" in " ".join(args) else "config"
    argv = ["fit", "--quiet", *[a.format(f=target) for a in args]] if command == "fit" else \
        ["config", "show", *[a.format(f=target) for a in args]]
    assert_exit_2(runner.invoke(app, argv), expected.format(f=target))
