"""Weight surgery for transfer learning, for any classifier: small pure functions, each with one job.

They find a network's first convolution and classifier head, rebuild them for another input (channels)
and another label set, and cut the backbone into stages that train or stay frozen at a given epoch.
None of them trains anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
MAX_BODY_STAGES = 4  # the backbone's blocks are grouped into at most this many stages (+ the stem)


# ----------------------------------------------------------------------------- finding the parts

def first_conv(model: nn.Module) -> str | None:
    """Path of the first Conv2d in registration order: the stem of every torchvision and timm classifier."""
    return next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def head(model: nn.Module) -> str | None:
    """Path of the classifier: the last Linear, else a last 1x1 Conv2d (SqueezeNet); None if neither."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1][0] if convs and convs[-1][1].kernel_size == (1, 1) else None


def get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# ----------------------------------------------------------------------------- new layers

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
    if old.groups != 1:
        raise ValueError(f"the first convolution is grouped ({old.groups} groups); cannot change its inputs")
    conv = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                     dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
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


def replace_head(old: nn.Module, num_classes: int, generator: torch.Generator | None = None) -> nn.Module:
    """A Linear head (or SqueezeNet's 1x1 conv head) with ``num_classes`` outputs, freshly initialised."""
    if isinstance(old, nn.Linear):
        return new_head(old.in_features, num_classes, generator)
    conv = nn.Conv2d(old.in_channels, num_classes, 1)
    with torch.no_grad():
        nn.init.xavier_uniform_(conv.weight, generator=generator)
        nn.init.zeros_(conv.bias)
    return conv


# ----------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class Layout:
    """How a network splits for fine-tuning: new layers (always trained) and backbone stages, deepest first."""

    new: tuple[str, ...]
    stages: tuple[tuple[str, tuple[str, ...]], ...]  # (name, module paths), unfreezing order; "stem" last

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages)

    @property
    def body(self) -> tuple[str, ...]:
        """The backbone's blocks in forward order (what gradient checkpointing wraps)."""
        return tuple(p for name, paths in reversed(self.stages) if name != "stem" for p in paths)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _units(model: nn.Module, head_path: str | None) -> list[str]:
    """Top-level children, a long Sequential/ModuleList opened one level (MobileNet's ``features``)."""
    units = []
    for name, child in model.named_children():
        holds_head = head_path is not None and head_path.startswith(name + ".")
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) >= 4 and not holds_head:
            units += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            units.append(name)
    return [u for u in units if _has_params(model.get_submodule(u))]


def _inside(path: str | None, unit: str) -> bool:
    return path is not None and (path == unit or path.startswith(unit + "."))


def layout(model: nn.Module, new_conv: bool) -> Layout:
    """Stem (the first conv's block and the plain layers right after it), body blocks grouped into at most
    MAX_BODY_STAGES stages, and the head's block; ``new_conv``: the first conv was rebuilt (always trains)."""
    conv, head_path = first_conv(model), head(model)
    units = _units(model, head_path)
    head_at = next((i for i, u in enumerate(units) if _inside(head_path, u)), len(units))
    stem_end = next((i + 1 for i, u in enumerate(units[:head_at]) if _inside(conv, u)), 0)
    while stem_end < head_at and isinstance(model.get_submodule(units[stem_end]), _NORMS):
        stem_end += 1  # bn1 after conv1
    stem, body = units[:stem_end], units[stem_end:head_at]
    k = min(MAX_BODY_STAGES, len(body))
    groups = [body[round(i * len(body) / k):round((i + 1) * len(body) / k)] for i in range(k)]
    stages = [(g[0] if len(g) == 1 else f"{g[0]}..{g[-1]}", tuple(g)) for g in reversed(groups)]
    if stem:
        stages.append(("stem", tuple(stem)))
    new = tuple(units[head_at:]) + ((conv,) if new_conv and conv else ())
    return Layout(new, tuple(stages))


def unfrozen_stages(stage_names: tuple[str, ...], finetune: str, epoch: int, unfreeze_every: int = 1
                    ) -> tuple[str, ...]:
    """Backbone stages that train at ``epoch`` (0-based); new layers always train.

    full: all; frozen: none; gradual: one more stage every ``unfreeze_every`` epochs, deepest first
    (epoch 0 trains only the new layers).
    """
    if finetune == "full":
        return stage_names
    if finetune == "frozen":
        return ()
    if finetune == "gradual":
        return stage_names[: min(epoch // unfreeze_every, len(stage_names))]
    raise ValueError(f"unknown finetune mode {finetune!r}")


def apply_unfrozen(model: nn.Module, lay: Layout, stages: tuple[str, ...]) -> None:
    """Set ``requires_grad`` per stage, and keep frozen stages' normalisation statistics fixed (eval mode).

    Call after ``model.train()``. Parameters outside every stage and new layer (ViT's class token) go with
    the last stage to unfreeze (the stem). New layers always train.
    """
    owner = {p: name for name, paths in lay.stages for p in paths}
    last = lay.stages[-1][0] if lay.stages else None
    for path, module in model.named_modules():
        if path in owner and owner[path] not in stages:
            module.eval()
    for path in lay.new:  # a new layer inside a frozen block (the stem's conv) keeps training mode
        model.get_submodule(path).train(model.training)
    for name, param in model.named_parameters():
        if any(_inside(name, n) for n in lay.new):
            param.requires_grad_(True)
            continue
        stage = next((owner[u] for u in owner if _inside(name, u)), last)
        param.requires_grad_(stage is None or stage in stages)


def is_new(lay: Layout, param_name: str) -> bool:
    return any(_inside(param_name, n) for n in lay.new)
