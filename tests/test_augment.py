"""data.augment: torchvision.transforms.v2's pack, every draw a function of (seed, epoch, rank, batch)."""
import subprocess
import sys

import torch
from typer.testing import CliRunner

import trainrig
from trainrig import data
from trainrig.cli import app
from trainrig.config.settings import AugmentSettings
from trainrig.data.augment import Augment
from trainrig.training import checkpoint

from conftest import assert_exit_2

PACK = ["data.augment.policy=randaugment", "data.augment.mixup=0.2", "data.augment.cutmix=1.0",
        "data.augment.mix_prob=0.8", "data.augment.erasing=0.5", "data.augment.resized_crop=[0.35,1.0]",
        "data.flip=true", "optim.label_smoothing=0.1"]


def _transform(**settings) -> data.BatchTransform:
    return data.BatchTransform(mean=(0.5,), std=(0.25,), channels_last=False,
                               augment=Augment(AugmentSettings(**settings), num_classes=10))


def test_draws_are_a_function_of_the_batch_and_leave_the_global_generator_alone():
    """The same batch generator gives the same images and soft targets; another batch index other ones; every
    image draws its own parameters; torch's global generator is where it was; mixed targets are
    distributions over the two labels that were mixed."""
    tf = _transform(policy="trivialaugment", erasing=0.5, resized_crop=[0.3, 1.0], mixup=0.4, cutmix=1.0)
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8).expand(16, 1, 28, 28).clone()
    images[:] = images[0]  # one image sixteen times: any difference below is the augmentation's
    labels = torch.arange(16) % 10
    before = torch.get_rng_state()
    x1, y1 = tf.batch(images, labels, torch.device("cpu"), data.augment_generator(0, 3, 1, 7))
    x2, y2 = tf.batch(images, labels, torch.device("cpu"), data.augment_generator(0, 3, 1, 7))
    x3, _ = tf.batch(images, labels, torch.device("cpu"), data.augment_generator(0, 3, 1, 8))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert len({x1[i].sum().item() for i in range(16)}) > 8  # not one draw for the whole batch
    assert y1.shape == (16, 10) and torch.allclose(y1.sum(1), torch.ones(16))
    mixed = [set(torch.nonzero(row).flatten().tolist()) for row in y1]
    assert all(s <= {int(labels[i]), int(labels[i - 1])} for i, s in enumerate(mixed))  # v2 mixes with roll(1)
    evaluation = tf.batch(images, labels, torch.device("cpu"), None)  # no generator: no augmentation
    assert torch.equal(evaluation[1], labels) and torch.equal(evaluation[0][0], evaluation[0][15])


def test_an_augmented_run_killed_mid_epoch_resumes_bitwise(tiny_cfg, tmp_path):
    """mixup + cutmix + RandAugment + erasing + resized crop + flips, label smoothing: a run SIGKILLed in the
    middle of epoch 2, after a step checkpoint, resumes from it and ends bitwise equal to an uninterrupted
    run (weights and every epoch's training and validation loss)."""
    recipe = [*PACK, "epochs=2", "checkpoint.every_n_steps=2", "data.synthetic_train=256"]  # 8 steps an epoch
    full = trainrig.fit(tiny_cfg(*recipe, "name=full"), progress="off")
    marker = tmp_path / "killed"
    kill = f"callbacks=[{{class_path: faults.KillOnce, init_args: {{rank: 0, step: 11, marker: '{marker}'}}}}]"
    cfg = tiny_cfg(*recipe, "name=part", kill)
    config = tmp_path / "part.yaml"
    config.write_text(trainrig.config.dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "trainrig", "fit", "-c", str(config), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9 and marker.is_file(), proc.stderr[-2000:]
    saved = checkpoint.load(full.run_dir.parent / "part" / "checkpoints" / "last.pt", mmap=True)
    assert (saved["global_step"], saved["batch"]) == (10, 2)  # epoch 2, two steps in
    resumed = trainrig.fit(cfg, resume="auto", progress="off")
    a, b = checkpoint.load(full.run_dir / "checkpoints" / "last.pt"), \
        checkpoint.load(resumed.run_dir / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for ra, rb in zip(full.history, resumed.history, strict=True):
        assert (ra["train_loss"], ra["train_acc"], ra["val_loss"]) == (rb["train_loss"], rb["train_acc"], rb["val_loss"])


def test_bad_resized_crop_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["fit", "--set", "data.name=synthetic", "--set",
                                      "data.augment.resized_crop=[0.5]", "--set", f"out_dir={tmp_path}"])
    assert_exit_2(result, "data.augment.resized_crop: expected [min, max] with 0 < min <= max <= 1, got [0.5]")
