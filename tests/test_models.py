import math

import pytest
import torch
import torchvision

from trainrig import models
from trainrig.config import ModelConfig
from trainrig.errors import CheckpointError
from trainrig.models.surgery import apply_unfrozen, fold_conv_weight, new_conv1, new_head, unfrozen_stages

RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "stem")


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
    cfg = ModelConfig(in_channels=1, num_classes=10)
    lay = models.layout_of(models.build_model(cfg, seed=0), cfg)
    assert lay.stage_names == RESNET_STAGES and set(lay.new) == {"conv1", "fc"}
    assert lay.body == ("layer1", "layer2", "layer3", "layer4")
    assert unfrozen_stages(lay.stage_names, "full", 0) == RESNET_STAGES
    assert unfrozen_stages(lay.stage_names, "frozen", 9) == ()
    got = [unfrozen_stages(lay.stage_names, "gradual", e, unfreeze_every=2) for e in range(0, 12, 2)]
    assert got == [RESNET_STAGES[:i] for i in range(6)]
    assert unfrozen_stages(lay.stage_names, "gradual", 1, unfreeze_every=2) == ()


def _step(model, stages):
    model.train()
    apply_unfrozen(model, models.layout_of(model, ModelConfig(in_channels=1)), stages)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8) % 10)
    loss.backward()
    opt.step()


def test_frozen_backbone_unchanged_after_step():
    model = models.build_model(ModelConfig(in_channels=1, num_classes=10), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, ())
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv1", "fc"}  # weights AND BatchNorm running stats of the backbone stay put


def test_gradual_trains_right_stages():
    model = models.build_model(ModelConfig(in_channels=1, num_classes=10), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, unfrozen_stages(RESNET_STAGES, "gradual", 2, unfreeze_every=1))
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
    cfg = ModelConfig(backbone_lr_scale=0.1)
    model = models.build_model(cfg)
    groups = models.param_groups(model, models.layout_of(model, cfg), cfg, lr=1.0)
    assert [g["lr"] for g in groups] == [1.0, 0.1]
    assert groups[0]["params"] == [model.conv1.weight, model.fc.weight, model.fc.bias]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- any torchvision classifier

FAMILIES = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
            "regnet_y_400mf", "densenet121"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_surgery_shapes_and_a_training_step(arch):
    """New first conv (1 channel) and head (7 classes) found wherever they sit; one step trains the
    new layers and, with finetune=frozen, leaves every backbone weight and BatchNorm statistic alone."""
    cfg = ModelConfig(arch=arch, in_channels=1, num_classes=7)
    model = models.build_model(cfg, seed=0)
    conv = model.get_submodule(models.first_conv(model))
    assert conv.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    lay = models.layout_of(model, cfg)
    assert 3 <= len(lay.stage_names) <= 5 and lay.stage_names[-1] == "stem"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    apply_unfrozen(model, lay, ())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.arange(4) % 7).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    new = lambda k: any(k.startswith(n + ".") for n in lay.new)  # noqa: E731
    assert changed and all(new(k) for k in changed), sorted(k for k in changed if not new(k))[:3]
    assert any(k.startswith(models.head(model)) for k in changed)


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_fold_keeps_grey_response(arch):
    """The folded first conv gives a grey image x the whole network's response to RGB (x, x, x): float64."""
    torch.manual_seed(0)
    rgb = torchvision.models.get_model(arch).double().eval()
    grey = models.build_model(ModelConfig(arch=arch, in_channels=3, num_classes=1000), seed=0).double().eval()
    grey.load_state_dict(rgb.state_dict())
    path = models.first_conv(grey)
    models.surgery.put(grey, path, new_conv1(grey.get_submodule(path), 1, "fold"))
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-9)


def test_gradual_unfreezing_on_mobilenet_stages():
    cfg = ModelConfig(arch="mobilenet_v2", in_channels=1, num_classes=5)
    model = models.build_model(cfg, seed=0)
    lay = models.layout_of(model, cfg)
    deepest = unfrozen_stages(lay.stage_names, "gradual", 1)
    model.train()
    apply_unfrozen(model, lay, deepest)
    trains = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("features.")}
    assert trains == {"0"} | {p.split(".")[1] for p in dict(lay.stages)[deepest[0]]}  # new stem conv + deepest
    assert "18" in trains and "1" not in trains


def test_unknown_arch_names_close_matches():
    from trainrig.errors import ConfigError

    with pytest.raises(ConfigError, match="resnet181.*did you mean resnet18"):
        models.build_model(ModelConfig(arch="resnet181"))


def test_timm_model_uses_timms_own_adaptation():
    timm = pytest.importorskip("timm")
    cfg = ModelConfig(arch="timm/resnet18", in_channels=1, num_classes=4)
    model = models.build_model(cfg, seed=0)
    assert isinstance(model, timm.models.ResNet) and model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert models.layout_of(model, cfg).stage_names == RESNET_STAGES
