"""Experiment trackers as callbacks: CSV files, TensorBoard, MLflow, Weights & Biases (offline by default).

``loggers: [csv, tensorboard, mlflow, wandb]`` picks them; each records the training loss and learning
rate every ``log_every_n_steps`` steps, the epoch metrics, the flattened config and the final figures.
They run on rank 0 only. A logger whose package is missing is refused before training starts.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

from trainrig.training import checkpoint, choose
from trainrig import config as config_mod
from trainrig.tracking import report
from trainrig.training.callbacks import Callback
from trainrig.config import Config
from trainrig.errors import ConfigError

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def flat_config(cfg: Config) -> dict[str, Any]:
    """Dotted keys -> scalars (lists and mappings as text): what trackers take as hyperparameters."""
    out: dict[str, Any] = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value and name not in ("init_args",):
                walk(value, name + ".")
            elif isinstance(value, (bool, int, float, str)) or value is None:
                out[name] = "null" if value is None else value
            else:
                out[name] = str(value)
    walk(config_mod.to_dict(cfg), "")
    return {k: v for k, v in out.items() if not k.startswith("tune.")}


def run_label(run: Any) -> str:
    """The run's name for trackers: its folder, or for a tune trial (folder <trial>/fit) the trial's."""
    folder = run.run_dir
    return folder.parent.name if folder.name == "fit" and run.cfg.name == "fit" else folder.name


def _finite(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}


class StepLogger(Callback):
    """Shared step bookkeeping: ``log(metrics, step)`` every ``log_every_n_steps`` training steps and at
    every epoch end; the global step counts training steps across epochs (and resumes)."""

    def __init__(self) -> None:
        self.batches = 1

    def log(self, metrics: dict[str, float], step: int, epoch_end: bool) -> None:
        raise NotImplementedError

    def on_epoch_start(self, run: Any, epoch: int, batches: int) -> None:
        self.batches = max(batches, 1)

    def global_step(self, run: Any, step: int) -> int:
        return run.state.epoch * self.batches + step

    def on_train_batch_end(self, run: Any, step: int, loss: Any) -> None:
        if step % run.cfg.log_every_n_steps == 0:
            lr, norm = run.state.optimizer.param_groups[0]["lr"], run.stepper.grad_norm
            metrics = {"train/loss": float(loss.item()), "train/lr": float(lr)}
            if norm is not None:  # optim.clip_grad_norm: the norm before clipping
                metrics["train/grad_norm"] = float(norm.item())
            self.log(metrics, self.global_step(run, step), False)

    def on_epoch_end(self, run: Any, row: dict) -> None:
        metrics = {f"epoch/{k}": v for k, v in _finite(row).items()}
        self.log(metrics, self.global_step(run, 0), True)

    final: dict[str, float] = {}

    def on_test_end(self, run: Any, report: dict) -> None:
        self.final = _finite({"test_acc": report["accuracy"], "test_loss": report["loss"],
                              "test_macro_f1": report["macro_f1"], "test_ece": report["ece"]})

    def summary(self, run: Any) -> dict[str, float]:
        """The chosen epoch, its validation figures and the test figures of its checkpoint."""
        chosen = choose.best_row(run.state.history, run.cfg.checkpoint.monitor) or {}
        picked = {f"best_{k}": chosen[k] for k in ("epoch", "val_acc", "val_loss") if k in chosen}
        return {**_finite(picked), **self.final}


class CSVLogger(StepLogger):
    """metrics.csv (one row per epoch, rewritten from the whole history, so a resumed run's file equals an
    uninterrupted one's), steps.csv (step, epoch, train loss, lr, and the gradient norm with optim.clip_grad_norm,
    every log_every_n_steps) and log.txt."""

    def on_fit_start(self, run: Any) -> None:
        self.steps = run.run_dir / "steps.csv"
        if not self.steps.exists():
            checkpoint.atomic_write_text(self.steps, "step,epoch,train_loss,lr,grad_norm\n")

    def log(self, metrics: dict[str, float], step: int, epoch_end: bool) -> None:
        if not epoch_end:
            with open(self.steps, "a") as f:
                norm = f"{metrics['train/grad_norm']:.6g}" if "train/grad_norm" in metrics else ""
                f.write(f"{step},{step / self.batches:.4f},{metrics['train/loss']:.6g},{metrics['train/lr']:.6g},"
                        f"{norm}\n")

    def on_epoch_end(self, run: Any, row: dict) -> None:
        report.write_metrics(run.run_dir, run.state.history)

    def on_message(self, run: Any, text: str) -> None:
        """log.txt: the run's messages (data, run folder, resumes, warnings, OOM recovery), every start's."""
        with open(run.run_dir / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


class TensorBoardLogger(StepLogger):
    """Event files in <run>/tensorboard: train/* every N steps, epoch/* per epoch (x axis: epoch), the
    hyperparameters with the final metrics, and the curves figure."""

    def on_fit_start(self, run: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int, epoch_end: bool) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, int(metrics["epoch/epoch"]) if epoch_end else step)
        if epoch_end:
            self.writer.flush()

    def on_fit_end(self, run: Any) -> None:
        history = run.state.history
        if history:
            final = {f"hparam/{k}": v for k, v in self.summary(run).items()}
            self.writer.add_hparams(flat_config(run.cfg), final, run_name="hparams")
        curves = run.run_dir / "curves.png"
        if curves.is_file():
            from trainrig.data.images import decode

            self.writer.add_image("curves", decode(curves)[:3], len(history))
        self.writer.close()

    def on_exception(self, run: Any, exc: BaseException) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


class MLflowLogger(StepLogger):
    """One MLflow run per fit (through ``MlflowClient``, no global state): params, metrics per step and
    epoch, and config.yaml, curves.png and best.pt as artifacts."""

    def on_fit_start(self, run: Any) -> None:
        from mlflow import MlflowClient

        cfg = run.cfg
        uri = cfg.mlflow.tracking_uri or Path(cfg.out_dir, "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3 keeps its file store behind an opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = cfg.mlflow.experiment or cfg.name
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=run_label(run),
                                             tags={"trainrig.run_dir": str(run.run_dir)}).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict[str, float], step: int, epoch_end: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), v, now, step)
                                                    for k, v in metrics.items()])

    def on_fit_end(self, run: Any) -> None:
        if self.final:
            self.log(self.final, 0, True)
        for name in ("config.yaml", "curves.png", "metrics.csv", "eval.json", "report.html", "checkpoints/best.pt"):
            path = run.run_dir / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), str(Path(name).parent) if "/" in name else None)
        self.client.set_terminated(self.run_id, "FINISHED")

    def on_exception(self, run: Any, exc: BaseException) -> None:
        if hasattr(self, "run_id"):
            self.client.set_terminated(self.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")


def _wandb_mode(mode: str) -> str:
    """auto: online only with an API key (environment or netrc); never the interactive login prompt."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


class WandbLogger(StepLogger):
    """A W&B run in <run>/wandb (offline unless a key is configured): config, metrics, the curves image."""

    def on_fit_start(self, run: Any) -> None:
        import wandb

        cfg = run.cfg
        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_label(run),
                              tags=list(cfg.wandb.tags), config=flat_config(cfg), dir=str(run.run_dir),
                              mode=_wandb_mode(cfg.wandb.mode), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, metrics: dict[str, float], step: int, epoch_end: bool) -> None:
        self.run.log(metrics, step=step)

    def on_fit_end(self, run: Any) -> None:
        import wandb

        if run.state.history:
            self.run.summary.update(self.summary(run))
        curves = run.run_dir / "curves.png"
        if curves.is_file():
            self.run.log({"curves": wandb.Image(str(curves))}, step=self.global_step(run, 0))
        self.run.finish()

    def on_exception(self, run: Any, exc: BaseException) -> None:
        if hasattr(self, "run"):
            self.run.finish(exit_code=1)


LOGGERS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}


def make_loggers(cfg: Config) -> list[Callback]:
    """The configured loggers; every missing package is named at once, before anything trains."""
    missing = [f"loggers: {name} needs the '{module}' package (pip install 'trainrig[{extra}]')"
               for name in dict.fromkeys(cfg.loggers) if name in PACKAGES
               for module, extra in [PACKAGES[name]] if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError("; ".join(missing))
    return [LOGGERS[name]() for name in dict.fromkeys(cfg.loggers)]
