"""Files from elsewhere run no code; one run folder holds one run; bad input a new user tries is one line.

A crafted checkpoint names ``subprocess.Popen`` as its model with a command that would create a marker
file: nothing may create it, whatever command reads the checkpoint."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.io as tio
import yaml
from PIL import Image
from typer.testing import CliRunner

import trainrig
from trainrig.training import checkpoint
from trainrig.cli import app

from conftest import assert_exit_2

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch synthetic run (the folder, its config file)."""
    root = tmp_path_factory.mktemp("trusted")
    cfg = trainrig.load_config(None, ["data.name=synthetic", "data.synthetic_train=64", "data.synthetic_test=32",
                                      "data.batch_size=32", "epochs=1", "threads=1", f"out_dir={root / 'runs'}",
                                      "name=plain", "model.class_path=user_models.TinyNet",
                                      "model.init_args={width: 4}"])
    result = trainrig.fit(cfg, progress="off")
    config = root / "plain.yaml"
    config.write_text(trainrig.config.dump(cfg))
    return result.run_dir, config


def _crafted(source, target, marker):
    """``source``'s checkpoint with a config whose model is subprocess.Popen(['touch', marker])."""
    state = torch.load(source, weights_only=True)
    state["config"]["model"].update(class_path="subprocess.Popen", init_args={"args": ["touch", str(marker)]})
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def test_a_crafted_checkpoint_runs_nothing_in_eval_predict_export_and_resume(trained, tmp_path):
    run_dir, config = trained
    marker = tmp_path / "ran.txt"
    crafted = _crafted(run_dir / "checkpoints" / "last.pt", tmp_path / "evil.pt", marker)
    image = tmp_path / "x.png"
    tio.write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(image))
    commands = [["eval", "--checkpoint", str(crafted)], ["predict", str(image), "--checkpoint", str(crafted)],
                ["export", "--checkpoint", str(crafted), "--format", "safetensors", "--out", str(tmp_path / "m.st")]]
    for command in commands:
        assert_exit_2(runner.invoke(app, command), "its config names model.class_path='subprocess.Popen'; "
                                                   "importing it runs that module's code")
        assert "--trust-class-path" in runner.invoke(app, command).output
        trusting = runner.invoke(app, [*command, "--trust-class-path"])  # imported, then refused unbuilt
        assert_exit_2(trusting, "model.class_path: subprocess.Popen is not a subclass of torch.nn.Module")
    with pytest.raises(trainrig.ConfigError, match="trust_class_path=True"):
        trainrig.predict(crafted, [image])
    # resume: the crafted file is the run folder's newest checkpoint
    folder = tmp_path / "runs" / "plain" / "checkpoints"
    _crafted(run_dir / "checkpoints" / "last.pt", folder / "last.pt", marker)
    resumed = runner.invoke(app, ["fit", "-c", str(config), "--set", f"out_dir={tmp_path / 'runs'}", "--set",
                                  "epochs=2", "--resume", "--quiet"])
    assert_exit_2(resumed, "--resume: model.class_path='user_models.TinyNet' (trained with 'subprocess.Popen')")
    assert not marker.exists()


def test_a_class_path_of_another_kind_is_refused_before_it_is_built(tmp_path):
    marker = tmp_path / "ran.txt"
    base = ["fit", "-c", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={tmp_path}"]
    popen = runner.invoke(app, [*base, "--set", "model.class_path=subprocess.Popen",
                                "--set", f"model.init_args={{args: [touch, '{marker}']}}"])
    assert_exit_2(popen, "model.class_path: subprocess.Popen is not a subclass of torch.nn.Module (it is another "
                         "class); nothing was built")
    system = runner.invoke(app, [*base, "--set", f"callbacks=[{{class_path: os.system, init_args: {{command: "
                                                 f"'touch {marker}'}}}}]"])
    assert_exit_2(system, "callbacks[0].class_path: os.system is not a subclass of trainrig.Callback (it is a "
                          "builtin_function_or_method)")
    assert not marker.exists()


def test_your_own_class_path_in_a_checkpoint_loads_when_trusted(trained, tmp_path):
    run_dir, _ = trained
    best = run_dir / "checkpoints" / "best.pt"
    image = tmp_path / "x.png"
    tio.write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(image))
    refused = runner.invoke(app, ["predict", str(image), "--checkpoint", str(best)])
    assert_exit_2(refused, "model.class_path='user_models.TinyNet'")
    allowed = runner.invoke(app, ["predict", str(image), "--checkpoint", str(best), "--trust-class-path"])
    assert allowed.exit_code == 0, allowed.output
    from user_models import TinyNet  # or hand over the network itself: no import from the file at all
    assert trainrig.predict(best, [image], model=TinyNet(width=4))[0].labels


def _fit_cmd(config, *extra):
    return [sys.executable, "-m", "trainrig", "fit", "-c", str(config), "--quiet", *extra]


def test_one_run_folder_one_run(tmp_path):
    """Two `fit --resume auto` on one folder at once: one trains, the other exits 2 naming the holder; a lock
    left by a killed run is taken over with a warning; the folder is no busier for a finished run."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "shared", "out_dir": str(tmp_path / "runs"), "threads": 1, "epochs": 2,
        "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "batch_size": 16},
        "model": {"class_path": "user_models.TinyNet"}, "optim": {"name": "adam"}}))
    lock, go = tmp_path / "runs" / "shared" / ".lock", tmp_path / "go"
    held = f"callbacks=[{{class_path: faults.WaitFor, init_args: {{path: '{go}'}}}}]"
    first = subprocess.Popen(_fit_cmd(config, "--resume", "auto", "--set", held), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(_fit_cmd(config, "--resume", "auto"), capture_output=True, text=True, timeout=120)
    go.write_text("go")
    assert first.wait(timeout=240) == 0, first.stderr.read().decode()[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    line = second.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, line
    assert f"runs/shared: in use by PID {first.pid} on " in line and "(python -m trainrig fit -c " in line, line
    metrics = (tmp_path / "runs" / "shared" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in metrics[1:]] == ["1", "2"]  # each epoch once
    assert lock.read_text() == ""  # released
    lock.write_text(json.dumps({"pid": 999999, "host": "gone", "since": "2026-01-01 00:00:00"}))  # a killed holder
    again = subprocess.run(_fit_cmd(config, "--resume", "auto", "--set", "epochs=3"), capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "warning: took over" in again.stderr and "PID 999999 on gone" in again.stderr, again.stderr[-2000:]
    fresh = trainrig.fit(trainrig.load_config(config, ["epochs=1"]), progress="off")
    assert fresh.run_dir.name == "shared-2"  # a fresh run never shares a folder


# ------------------------------------------------------------------ bad input a new user tries

def _folder(root, classes=("cat", "dog"), n=4, size=16):
    gen = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            tio.write_png(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen),
                          str(root / c / f"{i}.png"))
    return root


def test_an_animated_gif_among_pngs_is_read_as_its_first_frame(tmp_path):
    root = _folder(tmp_path / "imgs")
    frames = [Image.new("RGB", (16, 16), (40 * k, 0, 255 - 40 * k)) for k in range(3)]
    frames[0].save(root / "cat" / "anim.gif", save_all=True, append_images=frames[1:])
    first = torch.from_numpy(np.array(Image.open(root / "cat" / "anim.gif").convert("RGB")))
    assert torch.equal(trainrig.data.images.decode(root / "cat" / "anim.gif"), first.permute(2, 0, 1))
    result = runner.invoke(app, ["fit", "--quiet", "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                                 "--set", f"out_dir={tmp_path / 'runs'}", "--set", "epochs=1", "--set",
                                 "model.class_path=user_models.TinyNet", "--set", "data.batch_size=4"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case,expected", [
    ("link-to-root", "class folder 'bird' is a link to"),
    ("link-to-class", "the same file is also in class 'cat' (through a link)"),
    ("1x1-first", "data.image_size: null takes the first training image's size, and {root}/cat/"),
])
def test_image_folders_that_would_train_wrong(tmp_path, case, expected):
    root = _folder(tmp_path / "imgs")
    if case == "link-to-root":
        os.symlink(root, root / "bird")
    elif case == "link-to-class":
        os.symlink(root / "cat", root / "dog2")
    else:
        for image in (root / "cat").iterdir():
            tio.write_png(torch.zeros(3, 1, 1, dtype=torch.uint8), str(image))
    result = runner.invoke(app, ["fit", "--quiet", "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                                 "--set", f"out_dir={tmp_path / 'runs'}"])
    assert_exit_2(result, expected.format(root=root))
    if case == "1x1-first":
        assert ".png is 1x1; set data.image_size (>= 8) to resize every image" in result.output


@pytest.mark.parametrize("name,expected", [
    ("a" * 300, "name: a folder name of at most 200 bytes, got 300"),
    ("ab\0c", "name: control characters (here '\\x00') cannot be in a name or path"),
])
def test_run_names_no_file_system_takes(tmp_path, name, expected):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": name, "out_dir": str(tmp_path)}))
    assert_exit_2(runner.invoke(app, ["fit", "-c", str(config), "--quiet"]), expected)
    assert list(tmp_path.iterdir()) == [config]


def test_trainer_runs_flags_damaged_runs_and_lists_the_rest(trained, tmp_path):
    run_dir, _ = trained
    import shutil

    for name in ("ok", "cut", "nocolumn", "listconfig"):
        shutil.copytree(run_dir, tmp_path / name)
    metrics = (run_dir / "metrics.csv").read_text()
    (tmp_path / "cut" / "metrics.csv").write_text(metrics[: metrics.index("\n") + 6])
    (tmp_path / "nocolumn" / "metrics.csv").write_text("\n".join(",".join(r.split(",")[:3])
                                                                 for r in metrics.splitlines()))
    shutil.rmtree(tmp_path / "nocolumn" / "checkpoints")
    (tmp_path / "listconfig" / "config.yaml").write_text("- a\n- b\n")
    result = runner.invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for name, why in (("cut", "metrics.csv damaged (a row is cut short or too long)"),
                      ("nocolumn", "metrics.csv damaged (no lr column)"),
                      ("listconfig", "config.yaml is a list, not a mapping")):
        assert f"damaged: {tmp_path / name}: {why}" in text, text
    assert "│ ok " in result.output and "1/1 damaged" in text  # cut: its epochs read from last.pt


def test_outputs_below_a_file_or_in_an_unwritable_place(trained, tmp_path):
    run_dir, _ = trained
    best = str(run_dir / "checkpoints" / "best.pt")
    (tmp_path / "file").write_text("x")
    image = tmp_path / "x.png"
    tio.write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(image))
    trust = ["--trust-class-path"]
    for command, key in ((["export", "--checkpoint", best, "--format", "safetensors", *trust], "--out"),
                         (["predict", str(image), "--checkpoint", best, *trust], "--out"),
                         (["runs", str(run_dir.parent)], "--plot")):
        below = runner.invoke(app, [*command, key, str(tmp_path / "file" / "out.x")])
        assert_exit_2(below, f"{key} {tmp_path / 'file' / 'out.x'}: {tmp_path / 'file'} is a file, not a folder")
        proc = runner.invoke(app, [*command, key, "/proc/out.x"])  # unwritable even for root
        assert_exit_2(proc, f"{key} /proc/out.x: cannot write there")
    assert_exit_2(runner.invoke(app, ["eval", "--checkpoint", str(run_dir), *trust]),
                  f"{run_dir}: is a folder; give a checkpoint file such as {run_dir / 'checkpoints' / 'best.pt'}")
    assert checkpoint.load(best)["epoch"] == 1


def test_resume_auto_on_a_file_named_like_the_run(tmp_path):
    """Was a new folder on every restart (name-2, name-3, ...): each start silently began again."""
    (tmp_path / "smoke").write_text("not a run")
    result = runner.invoke(app, ["fit", "-c", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={tmp_path}",
                                 "--resume", "auto"])
    assert_exit_2(result, f"--resume: {tmp_path / 'smoke'} is a file, not a run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke"]
