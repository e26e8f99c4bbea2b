"""What a resumed run may change: where and how fast it runs, not what it computes."""
from __future__ import annotations

import dataclasses
from typing import Any

from trainrig.config import Config, _join, load, to_dict
from trainrig.errors import ConfigError

# Keys a resumed run may change: where and how fast it runs, not what it computes (epochs may grow).
RESUME_FREE = ("name", "out_dir", "epochs", "resume", "restarts", "launcher", "device", "devices", "threads",
               "dist_timeout_s", "callbacks", "loggers", "log_every_n_steps", "data.root",
               "data.num_workers", "data.pin_memory", "data.eval_batch_size")

FREE_SECTIONS = ("tune.", "ray.", "checkpoint.", "mlflow.", "wandb.", "eval.",
                 "early_stopping.")  # every key in them is free too (early stopping: when to stop, like epochs)

# Keys a run fills in when they are null (auto): a resumed run asking for null/auto keeps the found value.
FOUND_AT_START = ("data.batch_size", "data.image_size", "data.mean", "data.std", "data.classes",
                  "model.in_channels", "model.num_classes")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = _join(prefix, key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def mutable_keys(cfg: Config) -> tuple[str, ...]:
    """Keys Population Based Training changes between a trial's checkpoint and its continuation."""
    if cfg.tune.scheduler != "pbt":
        return ()
    return tuple(str(k) for k in (cfg.tune.pbt.mutations or cfg.tune.search_space))


def mutated(trained: Config, requested: Config) -> dict[str, tuple[Any, Any]]:
    """The PBT keys whose requested value differs from the trained one: key -> (trained, requested)."""
    old, new = _flatten(to_dict(trained)), _flatten(to_dict(requested))
    return {k: (old.get(k), new.get(k)) for k in mutable_keys(requested) if old.get(k) != new.get(k)}


def resume_config(trained: Config, requested: Config, epochs_done: int) -> Config:
    """The config a resumed run continues with: the one it was trained with, plus the requested values of
    the keys in RESUME_FREE (and of the keys a PBT search mutates). Any other difference would silently
    train another recipe: refused, naming keys."""
    old, new = _flatten(to_dict(trained)), _flatten(to_dict(requested))
    allowed = set(mutable_keys(requested))
    changed = [k for k in old if old[k] != new.get(k) and k not in RESUME_FREE and not k.startswith(FREE_SECTIONS)
               and not (k in FOUND_AT_START and new.get(k) in (None, "auto")) and k not in allowed]
    if changed:
        shown = ", ".join(f"{k}={new.get(k)!r} (trained with {old[k]!r})" for k in changed)
        raise ConfigError(f"--resume: {shown}; a resumed run keeps its recipe (only epochs may grow): "
                          f"drop the change or start a new run")
    if requested.epochs < epochs_done:
        raise ConfigError(f"--resume: epochs={requested.epochs} but the run already trained {epochs_done}")
    top = {k: getattr(requested, k) for k in RESUME_FREE if "." not in k}
    data = {k[len("data."):]: getattr(requested.data, k[len("data."):]) for k in RESUME_FREE if k.startswith("data.")}
    sections = {k.rstrip("."): getattr(requested, k.rstrip(".")) for k in FREE_SECTIONS}
    result = dataclasses.replace(trained, **top, **sections, data=dataclasses.replace(trained.data, **data))
    if not mutated(trained, requested):
        return result
    raw = to_dict(result)
    for key, (_, value) in mutated(trained, requested).items():
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = value
    return load(raw=raw)
