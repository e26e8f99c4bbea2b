"""Before a long run: lr-find, summary, profile (trainrig.preflight)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import trainrig
from trainrig import config as config_mod, models
from trainrig.data import synthetic
from trainrig.tracking import runs
from trainrig.cli import app

from conftest import TINY_NET as TINY
from user_models import LinearNet, Pairs

LINEAR = ["model.class_path=user_models.LinearNet", "optim.name=sgd", "optim.momentum=0", "precision=64-true",
          "data.synthetic_train=512"]


def _noisy_problem() -> tuple[Pairs, Pairs]:
    """trainrig's synthetic set (a template per class under noise) with 30% of the training labels redrawn:
    softmax regression on it learns at moderate rates and is thrown off by large ones."""
    images, labels, test_images, test_labels = synthetic.make(512, 64)
    gen = torch.Generator().manual_seed(1)
    redrawn = torch.where(torch.rand(512, generator=gen) < 0.3, torch.randint(0, 10, (512,), generator=gen), labels)
    classes = [f"c{i}" for i in range(10)]
    return Pairs(images, redrawn, classes), Pairs(test_images, test_labels, classes)


def _loss_after(train: Pairs, lr: float, steps: int = 16) -> float:
    """Plain torch, apart from trainrig: the training set's loss after ``steps`` SGD steps of batch 32 at a
    fixed ``lr`` from the seed's network (inputs normalised by the set's mean and std, as trainrig does)."""
    x = train.images.double().unsqueeze(1) / 255
    x, y = (x - x.mean()) / x.std(), torch.tensor(train.targets)
    torch.manual_seed(0)
    net = LinearNet().double()
    sgd = torch.optim.SGD(net.parameters(), lr=lr)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for batch in order.split(32)[:steps]:
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        sgd.step()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(x), y))


NOISY = ["model.class_path=null", "optim.name=sgd", "optim.momentum=0", "precision=64-true", "data.val_fraction=0",
         "checkpoint.monitor=last"]  # the caller's network and data (_noisy_problem); no validation needed


def _find(cfg: trainrig.Config, net: torch.nn.Module, train: Pairs, test: Pairs) -> trainrig.LRFindResult:
    return trainrig.lr_find(cfg, model=net, train_data=train, test_data=test, steps=60, min_lr=1e-5, max_lr=1e2)


def test_lr_find_suggests_a_rate_where_the_loss_falls_and_leaves_the_model_as_it_was(tiny_cfg):
    """The rates at which the loss falls are mapped independently (an epoch of 16 fixed-lr steps from the same
    start in a plain torch loop: the loss ends below 9/10 of where it began - here 0.01 to 0.316); the
    suggestion lies among them, and the caller's network ends bitwise as it came (weights restored)."""
    train, test = _noisy_problem()
    torch.manual_seed(0)
    net = LinearNet().double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    found = _find(tiny_cfg(*NOISY), net, train, test)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    start = _loss_after(train, 0.0, 0)
    grid = [10 ** (e / 2) for e in range(-10, 5)]
    good = [lr for lr in grid if _loss_after(train, lr) < 0.9 * start]
    assert good and grid[0] not in good and grid[-1] not in good  # too small and too large rates exist
    assert min(good) <= found.suggestion <= max(good), (found.suggestion, good)
    assert len(found.lrs) == len(found.losses) == len(found.smoothed) > 10
    assert found.lrs == sorted(found.lrs) and found.lrs[0] == pytest.approx(1e-5)
    assert found.losses[-1] > 2 * min(found.losses)  # stopped where it diverged
    assert found.plot.stat().st_size > 10_000 and found.run_dir.name == "tiny-lr-find"
    assert found.config is None and not (found.run_dir / "lr_find.yaml").exists()


def test_lr_find_under_ddp_sweeps_as_one_process(tiny_cfg):
    """2 DDP ranks, each half of every global batch, with the caller's network (float64): every step's loss,
    averaged over the ranks, equals one process's, so the suggestion is the same (lr_find also checks that the
    ranks agree, else it raises). Spawned ranks get the network's tensors in shared memory: each rank trains
    a copy of its own (once every rank stepped the same weights) and the caller's network is left as it was."""
    train, test = _noisy_problem()
    torch.manual_seed(0)
    net = LinearNet().double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    one = _find(tiny_cfg(*NOISY, "name=one"), copy.deepcopy(net), train, test)
    found = _find(tiny_cfg(*NOISY, "strategy=ddp", "devices=2"), net, train, test)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert len(found.losses) == len(one.losses)
    assert found.losses == pytest.approx(one.losses, rel=1e-9, abs=1e-12)
    assert found.suggestion == one.suggestion and found.plot.is_file()


def test_lr_find_apply_writes_a_config_trainer_fit_runs(tiny_cfg, tmp_path):
    """--apply: lr_find.yaml is the given config with optim.lr = the suggestion (the given file untouched),
    and trainer fit runs it."""
    given = tmp_path / "tiny.yaml"
    given.write_text(config_mod.dump(tiny_cfg(*LINEAR[:3], "epochs=1")))
    text = given.read_text()
    runner = CliRunner()
    found = runner.invoke(app, ["lr-find", "--config", str(given), "--steps", "30", "--min-lr", "1e-4",
                                "--max-lr", "10", "--apply"])
    assert found.exit_code == 0, found.output
    assert "suggested optim.lr" in found.output and given.read_text() == text
    written = tmp_path / "runs" / "tiny-lr-find" / "lr_find.yaml"
    lr = yaml.safe_load(written.read_text())["optim"]["lr"]
    assert 1e-4 <= lr <= 10 and f"{lr:.3g}" in " ".join(found.output.split())
    fitted = runner.invoke(app, ["fit", "--config", str(written), "--quiet"])
    assert fitted.exit_code == 0, fitted.output
    saved = torch.load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["optim"]["lr"] == lr
    assert [p.name for p in runs.find(tmp_path / "runs")] == ["tiny"]  # the probe's folder is not a run


def test_lr_find_bad_range_is_one_line(tiny_cfg):
    result = CliRunner().invoke(app, ["lr-find", "--set", "data.name=synthetic", "--min-lr", "1", "--max-lr", "0.1"])
    assert result.exit_code == 2 and "min_lr" in result.output and "Traceback" not in result.output


def test_summary_totals_and_flops_equal_torch_s_own_counts(tiny_cfg):
    """ResNet18 fine-tuned gradually, at epoch 1 (the head, the new stem conv and layer4 train): the parameter
    totals and the trainable split equal sum(p.numel()) over the network, the modules' rows add up to them,
    and the FLOPs equal FlopCounterMode's on the same input; the caller's network keeps its flags."""
    cfg = tiny_cfg("model.class_path=null", "model.arch=resnet18", "model.finetune=gradual", "data.batch_size=16")
    net = trainrig.build_model(cfg.model, seed=0)
    found = trainrig.summary(cfg, epoch=1, model=net)
    assert all(p.requires_grad for p in net.parameters())
    assert found.params == sum(p.numel() for p in net.parameters())
    layout = models.layout_of(net, cfg.model)
    training = tuple(layout.new) + dict(layout.stages)["layer4"]
    expected = sum(p.numel() for name, p in net.named_parameters() if name.startswith(tuple(f"{m}." for m in training)))
    assert found.trainable == expected and 0 < found.trainable < found.params
    assert sum(r.params for r in found.rows) == found.params and sum(r.trainable for r in found.rows) == expected
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(torch.zeros(1, 1, 28, 28))
    assert found.flops == counter.get_total_flops() > 0
    assert sum(r.flops for r in found.rows) == found.flops
    assert found.input == (1, 28, 28) and dict((r.name, r.output) for r in found.rows)["layer4"] == (512, 1, 1)
    shown = CliRunner().invoke(app, ["summary", "--set", "data.name=synthetic", "--set", "model.finetune=gradual",
                                     "--epoch", "1"])
    assert shown.exit_code == 0 and f"{found.params:,}" in shown.output and "frozen" in shown.output


def test_profile_writes_a_trace_with_step_events_and_a_data_wait_share(tiny_cfg):
    """trainer profile on a small run: trace.json loads as JSON with one ProfilerStep event per profiled
    step, the data wait is a share in [0, 1], the FLOPs are positive and the figures are printed."""
    result = CliRunner().invoke(app, ["profile", "--set", "data.name=synthetic", "--set", "data.synthetic_train=256",
                                      "--set", TINY, "--set", f"out_dir={tiny_cfg().out_dir}", "--set",
                                      "data.batch_size=16", "--steps", "4", "--warmup", "2"])
    assert result.exit_code == 0, result.output
    folder = Path(tiny_cfg().out_dir) / "fashion_resnet18-profile"
    events = json.loads((folder / "trace.json").read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 4 and any(e.get("name") == "data" for e in events)
    text = (folder / "profile.txt").read_text()
    share = float(re.search(r"data wait ([\d.]+)%", text).group(1)) / 100
    assert 0 <= share <= 1 and "aten::" in text and "images/s" in result.output
    assert float(re.search(r"([\d.]+) GFLOPs per step", text).group(1)) > 0
