"""Training controls: gradient accumulation and gradient clipping compute what their plain counterparts do, on
one process and on 2 DDP ranks (float64)."""
import csv
import dataclasses

import pytest
import torch

import trainrig
from trainrig import models
from trainrig.training import checkpoint

from test_distributed import F64, reference_params

NO_NORM = "model.class_path=user_models.NoNormNet"


def _last(result) -> dict:
    return checkpoint.load(result.run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize("ranks", [1, 2])
def test_accumulate_4_x_16_equals_batch_64(tiny_cfg, ranks):
    """4 accumulated batches of 16 make the optimizer steps batches of 64 make (a network without BatchNorm,
    whose micro-batches would see their own statistics): same weights (atol 1e-10), losses, schedule and step
    count, on one process and on 2 DDP ranks (gradients synchronised once per optimizer step)."""
    common = [F64, NO_NORM, "data.synthetic_train=256", "epochs=2", "sched.name=cosine"]
    common += ["strategy=ddp", "devices=2"] * (ranks == 2)
    big = trainrig.fit(tiny_cfg(*common, "data.batch_size=64", "name=big"), progress="off")
    acc = trainrig.fit(tiny_cfg(*common, "data.batch_size=16", "optim.accumulate=4", "name=acc"), progress="off")
    a, b = _last(big), _last(acc)
    assert a["global_step"] == b["global_step"] == 8  # 230 training images: 4 optimizer steps an epoch
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], rtol=0, atol=1e-10), key
    for ra, rb in zip(big.history, acc.history, strict=True):
        assert ra["lr"] == rb["lr"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-9)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-9)


def _clipped_reference(cfg: trainrig.Config, world: int, max_norm: float,
                       value: float | None = None) -> tuple[dict, list[float]]:
    """The one-process reference of test_distributed with torch.nn.utils.clip_grad_value_ (``value``) and
    clip_grad_norm_ before every step; the weights and the norms before norm clipping."""
    norms = []

    def clip(model):
        if value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), value)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
    return reference_params(cfg, world, clip), norms


@pytest.mark.parametrize("ranks,value", [(1, None), (2, None), (2, 0.002)])
def test_clip_grad_norm_equals_torch_on_the_reduced_gradients(tiny_cfg, ranks, value):
    """optim.clip_grad_norm (and clip_grad_value) clip what torch.nn.utils.clip_grad_norm_ (clip_grad_value_)
    clips, on the gradients averaged over the ranks (every step clipped here), and steps.csv logs each step's
    norm before norm clipping."""
    extra = ["strategy=ddp", "devices=2"] * (ranks == 2) + [f"optim.clip_grad_value={value}"] * (value is not None)
    cfg = tiny_cfg(F64, "optim.clip_grad_norm=0.05", "log_every_n_steps=1", "epochs=1", *extra)
    result = trainrig.fit(cfg, progress="off")
    expected, norms = _clipped_reference(cfg, ranks, 0.05, value)
    assert min(norms) > 0.05  # clipping acted on every step
    saved = _last(result)["model"]
    for name, value in expected.items():
        if "running" in name or "num_batches" in name:
            continue  # buffers: rank 0's under ddp
        assert torch.allclose(saved[name], value, rtol=0, atol=1e-9), name
    logged = [float(r["grad_norm"]) for r in csv.DictReader(open(result.run_dir / "steps.csv"))]
    assert logged == pytest.approx(norms, rel=1e-5)


class Crash(Exception):
    pass


class CrashAt(trainrig.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, run, step, loss):
        if run.state.global_step == self.step:
            raise Crash


def test_accumulated_clipped_run_resumes_mid_epoch_exactly(tiny_cfg):
    """Checkpoints land on optimizer-step boundaries (a step is ``accumulate`` micro-batches): a run crashed
    mid-epoch resumes from the step checkpoint and ends bitwise equal to an uninterrupted one, with flips,
    a per-step schedule and clipping."""
    recipe = ["optim.accumulate=2", "data.batch_size=16", "optim.clip_grad_norm=0.5", "data.flip=true",
              "sched.name=cosine", "epochs=2", "checkpoint.every_n_steps=2",
              "data.synthetic_train=256"]  # 230 training images: 8 optimizer steps an epoch
    full = trainrig.fit(tiny_cfg(*recipe, "name=full"), progress="off")
    cfg = tiny_cfg(*recipe, "name=part")
    with pytest.raises(Crash):
        trainrig.fit(cfg, resume="auto", progress="off", callbacks=[CrashAt(11)])
    saved = checkpoint.load(full.run_dir.parent / "part" / "checkpoints" / "last.pt", mmap=True)
    assert (saved["global_step"], saved["batch"]) == (10, 2)  # epoch 2, two optimizer steps in
    resumed = trainrig.fit(cfg, resume="auto", progress="off")
    a, b = _last(full), _last(resumed)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]


def test_param_groups_no_decay_on_biases_and_norms_and_layer_wise_lr(tiny_cfg):
    """optim.no_decay_norm_bias: every 1-D parameter (biases, BatchNorm weights) in a group without weight
    decay, the rest with it; optim.layer_decay: ResNet18's fc (new) at lr, layer4 at lr x d, layer3 at lr x d^2,
    ... the stem at lr x d^5, times backbone_lr_scale; every parameter in exactly one group. A run with them
    trains, and its optimizer state resumes."""
    cfg = tiny_cfg("model.class_path=null", "optim.weight_decay=0.1", "optim.no_decay_norm_bias=true",
                   "optim.layer_decay=0.5", "model.backbone_lr_scale=0.8", "optim.lr=0.01")
    model = models.build_model(cfg.model)
    lay = models.layout_of(model, cfg.model)
    groups = models.param_groups(model, lay, cfg.model, cfg.optim.lr, cfg.optim)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 0.1), names[id(p)]
    lrs = {names[id(p)].split(".")[0]: g["lr"] for g in groups for p in g["params"] if p.ndim > 1}
    expected = {"fc": 0.01, "layer4": 0.01 * 0.8 * 0.5, "layer3": 0.01 * 0.8 * 0.25, "layer2": 0.01 * 0.8 * 0.125,
                "layer1": 0.01 * 0.8 * 0.0625}
    for layer, lr in expected.items():
        assert lrs[layer] == pytest.approx(lr, rel=1e-12), layer
    assert lrs["conv1"] in (0.01, pytest.approx(0.01 * 0.8 * 0.5 ** 5))  # new (rebuilt for 1 channel) or stem
    result = trainrig.fit(dataclasses.replace(cfg, epochs=1), progress="off")
    saved = _last(result)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in saved] == [g["weight_decay"] for g in groups]
