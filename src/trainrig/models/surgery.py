"""Weight surgery for transfer learning: small pure functions, each with one job.

They adapt an ImageNet ResNet to another input (``conv1``) and another label set (``fc``), and decide
which backbone stages train at a given epoch. None of them trains anything.
"""
from __future__ import annotations

import math

import torch
from torch import nn

BACKBONE_STAGES = ("layer4", "layer3", "layer2", "layer1", "stem")  # unfreezing order, deepest first
STEM_MODULES = ("conv1", "bn1")


def new_layer_names(in_channels: int) -> tuple[str, ...]:
    """Layers built fresh by the surgery: fc always, conv1 when the input is not RGB."""
    return ("conv1", "fc") if in_channels != 3 else ("fc",)


def fold_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a conv kernel (out, c, kh, kw) to ``in_channels`` inputs, keeping its response.

    1 channel: sum the kernels over the channel axis, so a grey image x gives the same output as the
    RGB image (x, x, x) did. Other counts: repeat the kernels cyclically and rescale by c / in_channels,
    keeping the activation scale comparable (timm's ``adapt_input_conv`` rule).
    """
    out_ch, c, kh, kw = weight.shape
    if in_channels == c:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / c)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (c / in_channels)


def new_conv1(old: nn.Conv2d, in_channels: int, init: str, generator: torch.Generator | None = None) -> nn.Conv2d:
    """A conv like ``old`` (kernel, stride, padding) taking ``in_channels`` inputs.

    ``init="xavier"``: Xavier-uniform weights (the source notes); ``init="fold"``: :func:`fold_conv_weight`
    of the old kernel, so pretrained features survive the change of input.
    """
    conv = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                     dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        if init == "fold":
            conv.weight.copy_(fold_conv_weight(old.weight.detach(), in_channels))
            if old.bias is not None:
                conv.bias.copy_(old.bias.detach())
        elif init == "xavier":
            nn.init.xavier_uniform_(conv.weight, generator=generator)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        else:
            raise ValueError(f"unknown conv1 init {init!r}")
    return conv


def new_head(in_features: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """A new classifier: Xavier-uniform weight and U(-1/sqrt(n), 1/sqrt(n)) bias, n = in_features."""
    fc = nn.Linear(in_features, num_classes)
    bound = 1 / math.sqrt(in_features)
    with torch.no_grad():
        nn.init.xavier_uniform_(fc.weight, generator=generator)
        nn.init.uniform_(fc.bias, -bound, bound, generator=generator)
    return fc


def unfrozen_stages(finetune: str, epoch: int, unfreeze_every: int = 1) -> tuple[str, ...]:
    """Backbone stages that train at ``epoch`` (0-based); new layers always train.

    full: all; frozen: none; gradual: one more stage every ``unfreeze_every`` epochs, layer4 first
    (epoch 0 trains only the new layers).
    """
    if finetune == "full":
        return BACKBONE_STAGES
    if finetune == "frozen":
        return ()
    if finetune == "gradual":
        return BACKBONE_STAGES[: min(epoch // unfreeze_every, len(BACKBONE_STAGES))]
    raise ValueError(f"unknown finetune mode {finetune!r}")


def stage_modules(model: nn.Module, stage: str, new: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules of one backbone stage, leaving out layers the surgery built fresh."""
    names = STEM_MODULES if stage == "stem" else (stage,)
    return [getattr(model, name) for name in names if name not in new]


def apply_unfrozen(model: nn.Module, stages: tuple[str, ...], new: tuple[str, ...]) -> None:
    """Set ``requires_grad`` per stage, and keep frozen stages' BatchNorm statistics fixed (eval mode).

    Call after ``model.train()``: frozen stages are put back in eval mode so their running stats
    do not drift while their weights stay fixed.
    """
    for stage in BACKBONE_STAGES:
        trainable = stage in stages
        for module in stage_modules(model, stage, new):
            module.requires_grad_(trainable)
            if not trainable:
                module.eval()
    for name in new:
        getattr(model, name).requires_grad_(True)
