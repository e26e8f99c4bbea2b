"""model.ema (a moving average of the weights) and eval.tta (flip test-time augmentation)."""
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import trainrig
from trainrig.training import checkpoint
from trainrig.cli import app
from trainrig.training.ema import WeightAverage
from trainrig.trained.inference import evaluate_checkpoint
from trainrig.training.loop import evaluate

from conftest import assert_exit_2
from faults import SaveAverage

EMA = ["model.ema.decay=0.9", "data.flip=true", "sched.name=cosine", "data.batch_size=16", "epochs=2",
       "eval.test_every_epoch=true", "data.val_fraction=0", "checkpoint.monitor=last"]  # 128 training images


def test_update_is_a_warmed_up_lerp_and_copies_counters():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage.start(net)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked.fill_(7)
    avg.update(net, decay=0.99)  # first update: decay min(0.99, 1/10)
    assert torch.allclose(avg.tensors["0.weight"], 0.1 * w0 + 0.9 * (w0 + 1.0))
    assert int(avg.tensors["1.num_batches_tracked"]) == 7
    assert avg.decay_now(0.99) == pytest.approx(2 / 11) and avg.updates == 1
    avg.updates = 100
    assert avg.decay_now(0.5) == 0.5 and avg.decay_now(0.999) == pytest.approx(101 / 110)


def test_ema_evaluates_saves_and_resumes_exactly(tiny_cfg):
    full = trainrig.fit(tiny_cfg(*EMA, "name=full"), progress="off")
    saved = checkpoint.load(full.run_dir / "checkpoints" / "last.pt")
    assert saved["ema_updates"] == 16  # 128 images / 16 per step, 2 epochs
    averaged, trained = saved["model"], saved["training_weights"]
    assert not torch.equal(averaged["head.weight"], trained["head.weight"])
    # the row's test metrics are the average's: evaluating last.pt (its "model") gives them again
    again = evaluate_checkpoint(full.run_dir / "checkpoints" / "last.pt", trust_class_path=True)
    assert again["test_loss"] == pytest.approx(full.history[-1]["test_loss"], rel=1e-5)

    class Crash(Exception):
        pass

    class CrashAt(trainrig.Callback):
        def on_train_batch_end(self, run, step, loss):
            if run.state.global_step == 11:
                raise Crash

    cfg = tiny_cfg(*EMA, "name=part", "checkpoint.every_n_steps=5")
    with pytest.raises(Crash):
        trainrig.fit(cfg, progress="off", callbacks=[CrashAt()])
    resumed = trainrig.fit(cfg, resume="auto", progress="off")
    other = checkpoint.load(resumed.run_dir / "checkpoints" / "last.pt")
    for part in ("model", "training_weights"):
        for key, value in saved[part].items():
            assert torch.equal(value, other[part][key]), (part, key)
    assert [r["test_loss"] for r in full.history] == [r["test_loss"] for r in resumed.history]


def test_ema_starts_at_start_epoch(tiny_cfg):
    result = trainrig.fit(tiny_cfg(*EMA, "model.ema.start_epoch=1", "model.ema.every_n_steps=3",
                                   "checkpoint.keep_last=3"), progress="off")
    first = checkpoint.load(result.run_dir / "checkpoints" / "epoch=1-step=8.pt")
    assert "training_weights" not in first and "ema_updates" not in first
    last = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")
    assert last["ema_updates"] == 3  # steps 9, 12, 15: global steps divisible by 3 in epoch 2


def test_ddp_ranks_hold_equal_averages(tiny_cfg):
    cfg = tiny_cfg(*EMA, "strategy=ddp", "devices=2", "data.synthetic_test=101", "optim.name=adamw", "epochs=1")
    result = trainrig.fit(cfg, progress="off", callbacks=[SaveAverage()])
    ranks = [torch.load(result.run_dir / f"ema-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    saved = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(saved[k], v) for k, v in ranks[0].items())


def test_flip_tta_averages_the_logits_of_both_views():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    res = evaluate(net, [(x, y)], tta="flip")
    with torch.no_grad():
        mean = (net(x) + net(x.flip(3))) / 2
    assert res["test_loss"] == pytest.approx(float(nn.functional.cross_entropy(mean, y)), rel=1e-6)
    assert res["test_loss"] != pytest.approx(evaluate(net, [(x, y)])["test_loss"], rel=1e-6)
    mirrored = torch.cat([x[..., :4], x[..., :4].flip(3)], dim=3)  # symmetric images: flip changes nothing
    assert evaluate(net, [(mirrored, y)], tta="flip")["test_loss"] == \
        pytest.approx(evaluate(net, [(mirrored, y)])["test_loss"], rel=1e-6)


def test_tta_in_fit_eval_and_predict(tiny_cfg, tmp_path):
    result = trainrig.fit(tiny_cfg("eval.tta=flip", "epochs=1", "eval.test_every_epoch=true"), progress="off")
    ckpt = result.run_dir / "checkpoints" / "last.pt"
    assert evaluate_checkpoint(ckpt, trust_class_path=True)["test_loss"] == \
        pytest.approx(result.history[-1]["test_loss"], rel=1e-5)
    plain = evaluate_checkpoint(ckpt, ["eval.tta=none"], trust_class_path=True)["test_loss"]
    assert plain != pytest.approx(result.history[-1]["test_loss"], rel=1e-6)
    runner = CliRunner()
    out = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--tta", "none", "--trust-class-path"])
    assert out.exit_code == 0 and "tta none" in out.output
    assert_exit_2(runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--tta", "rotate"]), "eval.tta")
    image = tmp_path / "a.png"
    from PIL import Image
    Image.new("L", (28, 28), 128).save(image)
    a = trainrig.predict(ckpt, [image], tta="none", trust_class_path=True)[0].probabilities
    b = trainrig.predict(ckpt, [image], tta="flip", trust_class_path=True)[0].probabilities
    assert a == pytest.approx(b, rel=1e-5)  # a uniform image is its own mirror
