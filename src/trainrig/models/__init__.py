"""Build and adapt networks (never train them).

``build_model(cfg.model)`` returns any torchvision classifier (``arch``), a timm model (``timm/<name>``) or
the user's own class (``class_path``), with pretrained or random weights. torchvision models get the
surgery the source notes do for ResNet18: a new first convolution for ``in_channels`` inputs and a new
classifier head for ``num_classes`` outputs, wherever those layers sit in the network.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from trainrig.config import ModelConfig, OptimConfig
from trainrig.errors import CheckpointError, ConfigError
from trainrig.imports import construct, import_class
from trainrig.models import surgery
from trainrig.training import checkpoint
from trainrig.models.surgery import (Layout, apply_unfrozen, first_conv, fold_conv_weight, head, new_conv1, new_head, layout, unfrozen_stages)

__all__ = ["Layout", "build_model", "enable_grad_checkpointing", "load_state_dict_file", "param_groups",
           "apply_unfrozen", "unfrozen_stages", "layout_of", "fold_conv_weight", "new_conv1", "new_head",
           "first_conv", "head", "strip_prefixes", "torchvision_archs", "check_output"]

_PREFIXES = ("module.", "_orig_mod.")
_ARCH_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}  # plain logits, no aux outputs


def torchvision_archs() -> list[str]:
    import torchvision  # here, not at import: a process training your own class never pays its ~2 s

    return torchvision.models.list_models(module=torchvision.models)


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
    """Read a state_dict (or a trainrig checkpoint holding one under ``model``, or naming the shard folder
    that does) with weights_only=True; ``.safetensors`` files too (as ``trainer export`` writes them)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"model.weights: {path} is a folder; give a weights or checkpoint file (e.g. "
                              f"{path / 'checkpoints' / 'best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"model.weights: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and obj.get(checkpoint.SHARDS):  # a sharded run's step file: its tensors only
        obj = checkpoint.read_sharded(path.parent / str(obj[checkpoint.SHARDS]), "model")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return strip_prefixes(obj)


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise CheckpointError(
            f"model.weights=imagenet: could not get {weights} ({type(exc).__name__}: {exc}); it needs network "
            f"access or the file in the torch hub cache ({torch.hub.get_dir()}/checkpoints), or set "
            f"model.weights to a local state_dict path") from None


def _load(model: nn.Module, state: dict[str, torch.Tensor], source: str, skip: tuple[str, ...] = ()) -> None:
    def skipped(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in skip)

    state = {k: v for k, v in state.items() if not skipped(k)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not skipped(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shape mismatch {wrong[:3]}" if wrong else ""]
        raise CheckpointError(f"{source}: does not fit the model ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(state, strict=False)


def build_model(cfg: ModelConfig, seed: int | None = None) -> nn.Module:
    """The configured network with its weights. ``in_channels``/``num_classes`` null mean 1 and 10 here (the
    run fills them from the data first)."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.class_path:
        return _user_model(cfg)
    if cfg.arch.startswith("timm/"):
        return _timm_model(cfg)
    return _torchvision_model(cfg, torch.Generator().manual_seed(seed) if seed is not None else None)


def _channels_classes(cfg: ModelConfig) -> tuple[int, int]:
    return cfg.in_channels or 1, cfg.num_classes or 10


def _torchvision_model(cfg: ModelConfig, gen: torch.Generator | None) -> nn.Module:
    """Pretrained weights (if any), then the first-conv / head surgery.

    A weights file may hold either the original network (3-channel stem, any head) - it is loaded before the
    surgery - or an already adapted one (as trainrig saves it) - it is loaded after, so it round-trips.
    """
    archs = torchvision_archs()
    if cfg.arch not in archs:
        close = difflib.get_close_matches(cfg.arch, archs, n=3)
        raise ConfigError(f"model.arch={cfg.arch!r} is not a torchvision classification model"
                          f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} (list: "
                          f"torchvision.models.list_models(module=torchvision.models); timm models: timm/<name>)")
    in_channels, num_classes = _channels_classes(cfg)
    import torchvision

    model = torchvision.models.get_model(cfg.arch, **_ARCH_KWARGS.get(cfg.arch, {}))
    conv_path, head_path = first_conv(model), head(model)
    state, source = None, ""
    if cfg.weights == "imagenet":
        state, source = _imagenet_state(cfg.arch), "imagenet weights"
    elif cfg.weights:
        state, source = load_state_dict_file(cfg.weights), str(cfg.weights)
    adapted = state is not None and _is_adapted(state, conv_path, head_path, in_channels, num_classes)
    if state is not None and not adapted:
        head_w = state.get(f"{head_path}.weight")
        fits = head_w is not None and head_w.shape == surgery.get(model, head_path).weight.shape
        _load(model, state, source, skip=() if fits else (head_path,))
    if conv_path and in_channels != surgery.get(model, conv_path).in_channels:
        surgery.put(model, conv_path, new_conv1(surgery.get(model, conv_path), in_channels, cfg.conv1_init, gen))
    surgery.put(model, head_path, surgery.replace_head(surgery.get(model, head_path), num_classes, gen))
    if adapted:
        _load(model, state, source)
    if not cfg.stem_pool:
        if not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
            raise ConfigError(f"model.stem_pool=false: {cfg.arch} has no stem max-pool (model.maxpool) to remove")
        model.maxpool = nn.Identity()  # no weights: checkpoints are the same either way
    return model


def _is_adapted(state: dict[str, torch.Tensor], conv_path: str | None, head_path: str | None, in_channels: int,
                num_classes: int) -> bool:
    conv, fc = state.get(f"{conv_path}.weight"), state.get(f"{head_path}.weight")
    return (conv is not None and fc is not None and conv.shape[1] == in_channels
            and fc.shape[0] == num_classes and (in_channels != 3 or num_classes != 1000))


def _timm_model(cfg: ModelConfig) -> nn.Module:
    """timm's own adaptation: ``in_chans`` (its adapt_input_conv) and ``num_classes`` (a new head)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.arch={cfg.arch}: timm is not installed (pip install 'trainrig[timm]')") from None
    name = cfg.arch.removeprefix("timm/")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"model.arch={cfg.arch!r}: timm has no model {name!r}"
                          f"{'; did you mean ' + ', '.join('timm/' + c for c in close) + '?' if close else ''}")
    in_channels, num_classes = _channels_classes(cfg)
    try:
        model = timm.create_model(name, pretrained=cfg.weights == "imagenet", in_chans=in_channels,
                                  num_classes=num_classes)
    except Exception as exc:  # hub download errors come in many types
        raise CheckpointError(f"model.arch={cfg.arch}: timm could not build it with model.weights={cfg.weights} "
                              f"({type(exc).__name__}: {exc})") from None
    if cfg.weights not in (None, "imagenet"):
        _load(model, load_state_dict_file(cfg.weights), str(cfg.weights))
    return model


def _user_model(cfg: ModelConfig) -> nn.Module:
    if cfg.weights == "imagenet":
        raise ConfigError("model.weights=imagenet needs model.arch; for model.class_path give a state_dict path")
    cls = import_class(cfg.class_path, "model.class_path", nn.Module, "torch.nn.Module")
    model = construct(cls, dict(cfg.init_args), "model.init_args")
    if cfg.weights:
        _load(model, load_state_dict_file(cfg.weights), str(cfg.weights))
    return model


def layout_of(model: nn.Module, cfg: ModelConfig) -> Layout:
    """Fine-tuning stages of the built model; the first conv counts as new when the surgery replaced it."""
    rebuilt = not cfg.class_path and not cfg.arch.startswith("timm/") and (cfg.in_channels or 1) != 3
    return layout(model, new_conv=rebuilt)


def param_groups(model: nn.Module, lay: Layout, cfg: ModelConfig, lr: float,
                 optim: OptimConfig | None = None) -> list[dict]:
    """Optimizer groups: new layers at ``lr``, the pretrained backbone at ``lr * backbone_lr_scale``. With
    ``optim.layer_decay`` d, backbone stage k below the new layers (deepest first, the stem last) trains at
    ``lr * backbone_lr_scale * d**k`` (timm's and BEiT's layer-wise decay); with ``optim.no_decay_norm_bias``
    every 1-D parameter (biases, norm weights) gets no weight decay (timm's filter_bias_and_bn)."""
    named = list(model.named_parameters())
    if optim is not None and (optim.layer_decay or optim.no_decay_norm_bias):
        return _finer_groups(named, lay, cfg, lr, optim)
    if cfg.backbone_lr_scale == 1.0:
        return [{"params": [p for _, p in named], "lr": lr, "name": "all"}]
    new = [p for name, p in named if surgery.is_new(lay, name)]
    body = [p for name, p in named if not surgery.is_new(lay, name)]
    return [{"params": new, "lr": lr, "name": "new"},
            {"params": body, "lr": lr * cfg.backbone_lr_scale, "name": "backbone"}]


def _finer_groups(named: list, lay: Layout, cfg: ModelConfig, lr: float, optim: OptimConfig) -> list[dict]:
    """One group per (stage, decayed or not), in the order the parameters come."""
    depth = {path: k for k, (_, paths) in enumerate(lay.stages, 1) for path in paths}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in named:
        stage = "new" if surgery.is_new(lay, name) else next(
            (path for path in depth if name == path or name.startswith(path + ".")), "rest")
        scale = 1.0 if stage == "new" else cfg.backbone_lr_scale * (optim.layer_decay or 1.0) ** depth.get(
            stage, len(lay.stages))
        plain = optim.no_decay_norm_bias and p.ndim <= 1
        group = groups.setdefault((stage, plain), {
            "params": [], "lr": lr * scale, "name": f"{stage}{' (no decay)' if plain else ''}",
            "weight_decay": 0.0 if plain else optim.weight_decay})
        group["params"].append(p)
    return list(groups.values())


def enable_grad_checkpointing(model: nn.Module, blocks: tuple[str, ...]) -> nn.Module:
    """Recompute each backbone block's activations during backward instead of keeping them (an OOM remedy).

    Only the blocks' ``forward`` is wrapped, so parameter names - and checkpoints - stay those of the plain
    model. In train mode BatchNorm's running statistics see the recomputed forward too (updated twice per
    step); the gradients are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for name in blocks:
        block = model.get_submodule(name)
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)
        block.forward = forward
    return model


def check_output(model: nn.Module, size: int, c: int, n: int) -> None:
    """A network of the user's must map (N, C, H, W) images to (N, num_classes) logits: say so before training."""
    was_training, first = model.training, next(model.parameters())
    try:
        with torch.no_grad():  # in the network's own dtype: a float64 one is moved to nothing
            out = model.eval()(torch.zeros(2, c, size, size, device=first.device, dtype=first.dtype))
    except Exception as exc:
        raise ConfigError(f"model: {type(model).__name__} fails on a (2, {c}, {size}, {size}) batch: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model: {type(model).__name__} returns {shape} for a (2, {c}, {size}, {size}) batch; "
                          f"expected logits of shape (2, {n}) (model.num_classes={n})")
