import math

import pytest
import torch
import torchvision

from trainrig import models
from trainrig.config import ModelConfig
from trainrig.errors import CheckpointError
from trainrig.models.surgery import apply_unfrozen, fold_conv_weight, new_conv1, new_head, unfrozen_stages


def test_conv1_and_fc_shapes():
    model = models.build_model(ModelConfig(in_channels=1, num_classes=10), seed=0)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert (model.conv1.stride, model.conv1.padding) == ((2, 2), (3, 3))
    assert model.fc.weight.shape == (10, 512) and model.fc.bias.shape == (10,)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    big = models.build_model(ModelConfig(arch="resnet50", in_channels=3, num_classes=7))
    assert big.fc.weight.shape == (7, 2048) and big.conv1.weight.shape == (64, 3, 7, 7)


def test_head_init_statistics():
    gen = torch.Generator().manual_seed(0)
    fc = new_head(512, 1000, gen)
    bound = math.sqrt(6 / (512 + 1000))  # Xavier-uniform bound
    w = fc.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    b = fc.bias.detach()
    assert b.abs().max() <= 1 / math.sqrt(512) and b.abs().max() > 0.9 / math.sqrt(512)


def test_xavier_conv1_statistics():
    old = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    conv = new_conv1(old, 1, "xavier", torch.Generator().manual_seed(0))
    fan_in, fan_out = 1 * 49, 64 * 49
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert conv.weight.abs().max() <= bound
    assert abs(conv.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_fold_to_grey_keeps_response():
    """The same sum regrouped: compared in float64."""
    old = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False).double()
    grey = new_conv1(old, 1, "fold")
    assert grey.weight.dtype == torch.float64  # built like the conv it replaces
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    assert torch.allclose(grey(x), old(x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-12)


def test_fold_arithmetic_other_channel_counts():
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
    assert fold_conv_weight(w, 1)[:, 0, 0, 0].tolist() == [0 + 1 + 2, 3 + 4 + 5]
    five = fold_conv_weight(w, 5)
    assert five.shape == (2, 5, 1, 1)
    assert torch.allclose(five[:, :, 0, 0], torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 3, 4]]) * 3 / 5)
    assert torch.equal(fold_conv_weight(w, 3), w)


def test_gradual_unfreezing_schedule():
    assert unfrozen_stages("full", 0) == ("layer4", "layer3", "layer2", "layer1", "stem")
    assert unfrozen_stages("frozen", 9) == ()
    got = [unfrozen_stages("gradual", e, unfreeze_every=2) for e in range(0, 12, 2)]
    assert got == [(), ("layer4",), ("layer4", "layer3"), ("layer4", "layer3", "layer2"),
                   ("layer4", "layer3", "layer2", "layer1"), ("layer4", "layer3", "layer2", "layer1", "stem")]
    assert unfrozen_stages("gradual", 1, unfreeze_every=2) == ()


def _step(model, stages):
    model.train()
    apply_unfrozen(model, stages, models.new_layer_names(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8) % 10)
    loss.backward()
    opt.step()


def test_frozen_backbone_unchanged_after_step():
    model = models.build_model(ModelConfig(in_channels=1, num_classes=10), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, unfrozen_stages("frozen", 0))
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv1", "fc"}  # weights AND BatchNorm running stats of the backbone stay put


def test_gradual_trains_right_stages():
    model = models.build_model(ModelConfig(in_channels=1, num_classes=10), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, unfrozen_stages("gradual", 2, unfreeze_every=1))
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv1", "fc", "layer4", "layer3"}


def test_weights_file_round_trips(tmp_path):
    cfg = ModelConfig(in_channels=1, num_classes=10)
    trained = models.build_model(cfg, seed=1)
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, path)  # DDP-style prefix
    loaded = models.build_model(ModelConfig(in_channels=1, num_classes=10, weights=str(path)), seed=2)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_pretrained_file_is_adapted(tmp_path):
    """A 3-channel/1000-class file (an ImageNet-style state_dict) loads, then conv1 is folded and fc replaced."""
    imagenet_like = torchvision.models.resnet18()
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet_like.state_dict(), path)
    model = models.build_model(ModelConfig(weights=str(path), in_channels=1, conv1_init="fold"), seed=0)
    assert torch.allclose(model.conv1.weight, imagenet_like.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, imagenet_like.layer3[0].conv1.weight)
    assert model.fc.weight.shape == (10, 512)


def test_bad_weights_file(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        models.build_model(ModelConfig(weights=str(tmp_path / "missing.pt")))
    path = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        models.build_model(ModelConfig(weights=str(path)))


def test_backbone_lr_groups():
    model = models.build_model(ModelConfig(backbone_lr_scale=0.1))
    groups = models.param_groups(model, ModelConfig(backbone_lr_scale=0.1), lr=1.0)
    assert [g["lr"] for g in groups] == [1.0, 0.1]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
