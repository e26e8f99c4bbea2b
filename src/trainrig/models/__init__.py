"""Build and adapt networks (never train them).

``build_model(cfg.model)`` returns a torchvision ResNet with pretrained or random weights, a new ``conv1``
for ``in_channels`` inputs and a new ``fc`` for ``num_classes`` outputs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from .surgery import (BACKBONE_STAGES, apply_unfrozen, fold_conv_weight, new_conv1, new_head,
                      new_layer_names, unfrozen_stages)

__all__ = ["build_model", "enable_grad_checkpointing", "load_state_dict_file", "param_groups", "apply_unfrozen", "unfrozen_stages",
           "new_layer_names", "fold_conv_weight", "new_conv1", "new_head", "BACKBONE_STAGES"]

_ARCHS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict (or a trainrig checkpoint holding one under ``model``) with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.weights: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return strip_prefixes(obj)


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise CheckpointError(
            f"model.weights=imagenet: could not get {weights} ({type(exc).__name__}: {exc}); it needs network "
            f"access or the file in the torch hub cache ({torch.hub.get_dir()}/checkpoints), or set "
            f"model.weights to a local state_dict path") from None


def _load(model: nn.Module, state: dict[str, torch.Tensor], source: str, skip: tuple[str, ...] = ()) -> None:
    state = {k: v for k, v in state.items() if k.split(".")[0] not in skip}
    own = model.state_dict()
    missing = [k for k in own if k not in state and k.split(".")[0] not in skip]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shape mismatch {wrong[:3]}" if wrong else ""]
        raise CheckpointError(f"{source}: does not fit the model ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(state, strict=False)


def build_model(cfg: ModelConfig, seed: int | None = None) -> nn.Module:
    """The configured ResNet: pretrained weights (if any), then the conv1/fc surgery.

    A weights file may hold either the original network (3-channel conv1, any fc) - it is loaded before the
    surgery - or an already adapted one (as trainrig saves it) - it is loaded after, so it round-trips.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    model = _ARCHS[cfg.arch]()
    state, source = None, ""
    if cfg.weights == "imagenet":
        state, source = _imagenet_state(cfg.arch), "imagenet weights"
    elif cfg.weights:
        state, source = load_state_dict_file(cfg.weights), str(cfg.weights)
    adapted_shapes = state is not None and _is_adapted(state, cfg)
    if state is not None and not adapted_shapes:
        fc_fits = state.get("fc.weight") is not None and state["fc.weight"].shape == model.fc.weight.shape
        _load(model, state, source, skip=() if fc_fits else ("fc",))
    if cfg.in_channels != model.conv1.in_channels:
        model.conv1 = new_conv1(model.conv1, cfg.in_channels, cfg.conv1_init, gen)
    model.fc = new_head(model.fc.in_features, cfg.num_classes, gen)
    if adapted_shapes:
        _load(model, state, source)
    return model


def _is_adapted(state: dict[str, torch.Tensor], cfg: ModelConfig) -> bool:
    conv, fc = state.get("conv1.weight"), state.get("fc.weight")
    return (conv is not None and fc is not None and conv.shape[1] == cfg.in_channels
            and fc.shape[0] == cfg.num_classes and (cfg.in_channels != 3 or cfg.num_classes != 1000))


def param_groups(model: nn.Module, cfg: ModelConfig, lr: float) -> list[dict]:
    """Optimizer groups: new layers at ``lr``, the pretrained backbone at ``lr * backbone_lr_scale``."""
    new = new_layer_names(cfg.in_channels)
    head = [p for name, p in model.named_parameters() if name.split(".")[0] in new]
    body = [p for name, p in model.named_parameters() if name.split(".")[0] not in new]
    if cfg.backbone_lr_scale == 1.0:
        return [{"params": head + body, "lr": lr, "name": "all"}]
    return [{"params": head, "lr": lr, "name": "new"},
            {"params": body, "lr": lr * cfg.backbone_lr_scale, "name": "backbone"}]


def enable_grad_checkpointing(model: nn.Module, stages: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
                              ) -> nn.Module:
    """Recompute each ResNet stage's activations during backward instead of keeping them (an OOM remedy).

    Only the stages' ``forward`` is wrapped, so parameter names - and checkpoints - stay those of the plain
    model. In train mode BatchNorm's running statistics see the recomputed forward too (updated twice per
    step); the gradients are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for name in stages:
        stage = getattr(model, name)
        inner = stage.forward

        def forward(x: torch.Tensor, _inner=inner, _stage=stage) -> torch.Tensor:
            if torch.is_grad_enabled():
                return checkpoint(_inner, x, use_reentrant=False)
            return _inner(x)
        stage.forward = forward
    return model
