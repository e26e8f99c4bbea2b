"""Use a trained run: rebuild its model from a checkpoint, label image files with it.

Preprocessing comes from the checkpoint's config (channels, image size, per-channel mean/std), and an
image goes through the same functions training used (``data.images.load`` + the evaluation transform),
so a file gets the label ``trainer eval`` gives the same pixels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from trainrig.training import checkpoint, evaluation
from trainrig import config as config_mod, data, models
from trainrig.config import Config
from trainrig.data import images
from trainrig.errors import CheckpointError, ConfigError, DataError
from trainrig.training.step import eval_logits
from trainrig.parallel.base import default_threads, resolve_device


@dataclass
class Trained:
    """A checkpoint's model (eval mode, on its device) with the config it was trained with."""

    cfg: Config
    model: nn.Module
    epoch: int
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return list(self.cfg.data.classes or [])

    def transform(self) -> data.BatchTransform:
        """The evaluation batch transform of the run: same normalisation, dtype and memory format."""
        dtype = torch.float64 if self.cfg.precision == "64-true" else torch.float32
        return data.transforms(self.cfg.data, self.cfg.data.mean, self.cfg.data.std, self.cfg.model.channels_last,
                               dtype)[1]


def _complete(cfg: Config) -> Config:
    """Checkpoints from before the run config recorded classes/statistics: find them from the data."""
    if cfg.data.mean is not None and cfg.data.classes is not None and cfg.data.image_size is not None:
        return cfg
    splits = data.load_splits(cfg.data, cfg.seed, channels=cfg.model.in_channels,
                              pretrained=cfg.model.weights == "imagenet")
    return data.resolve(cfg, splits)


TRUST_HINT = "--trust-class-path (trust_class_path=True in Python)"


def check_trusted(cfg: Config, source: str | Path, trusted: bool) -> None:
    """A config read from a file someone else may have written (a checkpoint's) names code to import:
    refused unless the user said they trust it, since importing a module runs its code."""
    if cfg.model.class_path and not trusted:
        raise ConfigError(f"{source}: its config names model.class_path={cfg.model.class_path!r}; importing it "
                          f"runs that module's code. If you trust this file, pass {TRUST_HINT}; or pass your "
                          f"model instance (model=...)")


def load_trained(path: str | Path, overrides: Sequence[str] = (), *, model: nn.Module | None = None,
                 trust_class_path: bool = False) -> Trained:
    """Read a trainrig checkpoint (weights_only) and rebuild its network; ``model``: your own network's
    instance, for runs trained with ``fit(model=...)`` whose class needs constructor arguments. A
    ``model.class_path`` in the checkpoint's config is imported only with ``trust_class_path``."""
    state = checkpoint.load(path)
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a trainrig checkpoint (needs 'config' and 'model')")
    try:
        cfg = config_mod.from_dict(state["config"], overrides=list(overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: the checkpoint's config: {exc}") from None
    if model is None:
        check_trusted(cfg, path, trust_class_path)
    cfg = _complete(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None)))
    if model is None:
        try:
            model = models.build_model(cfg.model)
        except ConfigError as exc:
            raise ConfigError(f"{path}: cannot rebuild the network ({exc}); pass your model instance "
                              f"(trainrig.predict(..., model=net))") from None
    try:
        model.load_state_dict(models.strip_prefixes(state["model"]))
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the network ({str(exc).splitlines()[0]})") from None
    device = resolve_device(cfg.device)
    model = model.to(device, torch.float64 if cfg.precision == "64-true" else torch.float32).eval()
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Trained(cfg, model, int(state.get("epoch", 0)), device)


def image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted); a missing path is a DataError."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and images.is_image(f))
            if not inside:
                raise DataError(f"{p}: no image files in this folder")
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return found


@dataclass(frozen=True)
class Prediction:
    """One image's top-k classes, most probable first."""

    path: str
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]


@torch.inference_mode()
def predict(checkpoint_path: str | Path, paths: Sequence[str | Path], *, top_k: int = 3, batch_size: int = 64,
            model: nn.Module | None = None, tta: str | None = None, trust_class_path: bool = False) -> list[Prediction]:
    """Label image files (or folders of them) with a trained checkpoint; ``tta`` (none | flip) overrides the
    run's eval.tta; ``trust_class_path``: see load_trained."""
    trained = load_trained(checkpoint_path, [f"eval.tta={tta}"] if tta else (), model=model,
                           trust_class_path=trust_class_path)
    cfg, tf, names = trained.cfg, trained.transform(), trained.classes
    files = image_paths(paths)
    k = max(1, min(top_k, cfg.model.num_classes or 1))
    out: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        x = torch.stack([images.load(f, cfg.model.in_channels, cfg.data.image_size) for f in chunk])
        logits = eval_logits(trained.model, tf(x, trained.device, None), cfg.precision, cfg.eval.tta)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        top = probs.topk(k, dim=1)
        for f, p, i in zip(chunk, top.values.tolist(), top.indices.tolist()):
            out.append(Prediction(str(f), tuple(i), tuple(names[j] if j < len(names) else str(j) for j in i),
                                  tuple(p)))
    return out


def write_csv(predictions: Sequence[Prediction], path: str | Path) -> None:
    """path, then class_1, prob_1, ... class_k, prob_k per image (written atomically)."""
    import csv
    import io

    k = max((len(p.classes) for p in predictions), default=0)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", *[f"{w}_{i}" for i in range(1, k + 1) for w in ("class", "prob")]])
    for p in predictions:
        writer.writerow([p.path, *[v for c, pr in zip(p.classes, p.probabilities) for v in (c, f"{pr:.6f}")]])
    checkpoint.atomic_write_text(path, buf.getvalue())


def evaluate_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                        model: nn.Module | None = None, trust_class_path: bool = False,
                        out_dir: str | Path | None = None) -> dict[str, Any]:
    """Rebuild the model stored in a checkpoint and evaluate it on its config's test set: loss, accuracy and
    the full report (``report``: evaluation.py); ``out_dir``: write eval.json, confusion.png, mistakes.png and
    report.html there (``trust_class_path``: see inference.load_trained)."""
    trained = load_trained(path, overrides, model=model, trust_class_path=trust_class_path)
    cfg = trained.cfg
    torch.set_num_threads(default_threads(cfg, 1))
    built = data.build(cfg.data, device=trained.device, seed=cfg.seed, channels_last=cfg.model.channels_last,
                       dtype=torch.float64 if cfg.precision == "64-true" else torch.float32, splits=data.load_splits(cfg.data, cfg.seed, channels=cfg.model.in_channels))
    try:
        test = evaluation.evaluate_report(trained.model, built.test, trained.classes, precision=cfg.precision,
                                          tta=cfg.eval.tta, mistakes=cfg.eval.mistakes, bins=cfg.eval.calibration_bins)
    finally:  # a streamed set's loader workers end now, not whenever the garbage collector gets to them
        built.release()
    test = {"split": "test", "checkpoint": str(path), "epoch": trained.epoch, "seed": cfg.seed, "tta": cfg.eval.tta,
            **test}
    if out_dir is not None:
        evaluation.write_files(Path(out_dir), test, built.splits.test, title=Path(path).stem)
    return {"epoch": trained.epoch, "test_loss": test["loss"], "test_acc": test["accuracy"],
            "test_samples": test["samples"], "report": test}
