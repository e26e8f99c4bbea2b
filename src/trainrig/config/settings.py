"""Sections of the config schema (config/__init__.py imports them): the optimizer and schedule, evaluation,
checkpoints, early stopping, FSDP, the services a run can talk to (Ray Tune, a Ray cluster, MLflow, W&B), and
``opt``, the field helper of every config dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        min_exclusive: bool = False) -> Any:
    """A config field: its default, its help text and an optional numeric range."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


MONITORS = ("val_acc", "val_loss", "train_acc", "train_loss")  # what may choose: never a test_* metric


@dataclass(frozen=True)
class EvalConfig:
    tta: Literal["none", "flip"] = opt(
        "none", "Test-time augmentation: flip = the mean of the logits of each image and its mirror image "
        "(validation and test passes, trainer eval and predict; twice the evaluation cost).")
    test: bool = opt(
        True, "At the end of fit, evaluate the test set once, on the checkpoint checkpoint.monitor chose, and write "
        "eval.json, confusion.png, mistakes.png and report.html; tune's trials run without it (only the best "
        "trial's test accuracy is measured).")
    test_every_epoch: bool = opt(
        False, "Also evaluate the test set after every epoch (test_loss, test_acc in metrics.csv and the "
        "curves), for the curve only: no choice reads it.")
    mistakes: int = opt(16, "Highest-loss test images shown in mistakes.png and report.html.", min=0)
    calibration_bins: int = opt(15, "Bins of the expected calibration error in eval.json.", min=1)


@dataclass(frozen=True)
class CheckpointConfig:
    every_n_steps: Union[int, None] = opt(
        None, "Also save mid-epoch every N optimizer steps (with the position in the epoch: a resumed run goes on "
        "from that batch); null = off.", min=1)
    every_minutes: Union[float, None] = opt(
        5.0, "Also save mid-epoch once this many minutes passed since the last save: the most training a crash "
        "loses; null = epoch ends only. Under ddp the clock is read every 20 steps.", min=0.0, min_exclusive=True)
    keep_last: int = opt(2, "Newest checkpoints kept as checkpoints/epoch=E-step=S.pt (an unreadable newest one "
                         "falls back to the next); 0 = none beside last.pt and best.pt.", min=0)
    save_top_k: int = opt(1, "Epoch-end checkpoints kept (as epoch=E-step=S.pt) for the K best values of "
                          "monitor, beside the keep_last newest.", min=0)
    monitor: Literal["val_acc", "val_loss", "train_acc", "train_loss", "last"] = opt(
        "val_acc", "Metric that picks best.pt and save_top_k (accuracies maximised, losses minimised; ties: the "
        "earlier epoch), and so the checkpoint the test set is evaluated on at the end; last = the newest epoch. "
        "Never a test metric.")


@dataclass(frozen=True)
class EarlyStopping:
    monitor: Union[Literal["val_acc", "val_loss", "train_acc", "train_loss"], None] = opt(
        None, "Stop training when this metric has not improved for patience epochs; null = off.")
    patience: int = opt(3, "Epochs without improvement (by more than min_delta) before the run stops.", min=1)
    min_delta: float = opt(0.0, "Smallest change that counts as an improvement.", min=0.0)
    mode: Literal["auto", "max", "min"] = opt("auto", "auto = max for accuracies, min for losses.")


@dataclass(frozen=True)
class TuneResources:
    cpu: float = opt(1.0, "CPUs per trial (also the trial's torch threads).", min=0.0, min_exclusive=True)
    gpu: float = opt(0.0, "GPUs per trial; fractions share a GPU (0.5 = two trials per GPU).", min=0.0)


@dataclass(frozen=True)
class PBTSettings:
    perturbation_interval: int = opt(1, "pbt: epochs between exploit/explore decisions.", min=1)
    mutations: dict = opt(
        {}, "pbt: dotted keys the search may change during training, written like search_space (e.g. "
        "optim.lr: {loguniform: [1e-4, 1e-2]}); a restored trial continues with the new values in place (lr, "
        "weight_decay, momentum of its optimizer). Empty = the search_space's keys.")
    quantile_fraction: float = opt(0.25, "pbt: the bottom fraction copies (exploits) a top-fraction trial.",
                                   min=0.0, max=0.5)
    resample_probability: float = opt(0.25, "pbt: chance a mutated value is drawn afresh instead of perturbed.",
                                      min=0.0, max=1.0)
    synch: bool = opt(False, "pbt: decide for every trial at once when all reached the perturbation point (Ray's "
                      "synchronous PBT): the same decisions whatever the timing, at the cost of trials waiting "
                      "(paused) for the slowest.")


@dataclass(frozen=True)
class TuneSettings:
    name: str = opt("tune", "Experiment name: its folder is <storage_path>/<name>.")
    search_space: dict = opt(
        {}, "Dotted fit-config keys -> {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | "
        "{randint: [lo, hi]} (inclusive) | {pow2: [lo, hi]} (2**k, k in lo..hi) | {grid: [...]}.")
    searcher: Literal["random", "grid", "hyperopt", "optuna"] = opt(
        "hyperopt", "random (also runs grid entries), grid (every grid combination), hyperopt (TPE, HyperOpt: no "
        "release since 2021) or optuna (TPE, Optuna: maintained; seeded, resumable).")
    n_initial_points: int = opt(4, "hyperopt / optuna: random trials before TPE starts modelling.", min=1)
    scheduler: Literal["fifo", "asha", "hyperband", "pbt"] = opt(
        "fifo", "Trial scheduler; asha/hyperband stop poor trials early; pbt (Population Based Training) copies good "
        "trials' checkpoints into poor ones and mutates their hyperparameters during training (tune.pbt).")
    pbt: PBTSettings = opt(PBTSettings(), "Population Based Training (scheduler: pbt).")
    max_t: Union[int, None] = opt(None, "asha/hyperband: most epochs a trial may run; null = the fit config's epochs.",
                                  min=1)
    grace_period: int = opt(1, "asha: epochs every trial runs before it can be stopped.", min=1)
    reduction_factor: Union[float, None] = opt(
        None, "asha/hyperband: keep 1/reduction_factor of trials at each rung; null = Ray's default "
        "(asha 4, hyperband 3).", min=1.0, min_exclusive=True)
    metric: Literal["val_acc", "val_loss", "train_acc", "train_loss"] = opt(
        "val_acc", "Metric the searcher and scheduler (ASHA's cuts, PBT's donors, TPE's next point) and "
        "best.yaml use: a validation or training metric, never the test set's (only the best trial's test "
        "accuracy is measured, once, at the end).")
    mode: Literal["auto", "max", "min"] = opt("auto", "Maximise or minimise the metric; auto = max for accuracies, "
                                              "min for losses.")
    num_samples: int = opt(8, "Trials to run (with grid entries: samples per grid combination).", min=1)
    max_concurrent: int = opt(0, "Trials at once; 0 = as many as the cluster's CPUs/GPUs allow.", min=0)
    resources_per_trial: TuneResources = opt(TuneResources(), "Resources one trial holds.")
    address: Union[str, None] = opt(None, "Ray cluster to join (e.g. auto or ray://host:10001); null = local Ray.")
    storage_path: str = opt("runs/tune", "Parent folder of experiment folders.")
    seed: int = opt(0, "Seed of the searcher (the trials' own seed is the fit config's seed).")
    max_failures: int = opt(1, "Times a failed trial (its worker process died, or it raised) is restarted from its "
                            "last reported checkpoint (Ray's FailureConfig); 0 = never.", min=0)
    reuse_actors: bool = opt(True, "Run the next trial in a finished trial's worker process (skips process start "
                             "and imports; trials then share one process's memory, one after another).")
    object_store_mb: int = opt(256, "Object store size of a local Ray, MB (trials exchange little data).", min=80)


@dataclass(frozen=True)
class RaySettings:
    address: Union[str, None] = opt(
        None, "Ray cluster to join: auto (the one 'ray start' made on this machine) or ray://host:10001; null = "
        "a local Ray on this machine.")
    num_workers: int = opt(2, "Ray Train workers: the DDP ranks, one Ray worker process each.", min=1)
    use_gpu: bool = opt(False, "One GPU per worker.")
    resources_per_worker: dict = opt(
        {}, "Ray resources each worker holds, e.g. {CPU: 4, GPU: 1}; {} = Ray's default (1 CPU, and 1 GPU with "
        "use_gpu).")
    storage_path: Union[str, None] = opt(
        None, "Where Ray Train keeps its own run state (a shared folder or a cloud URI on a cluster); null = "
        "<run folder>/ray.")
    max_failures: int = opt(0, "Times the worker group is restarted after a worker dies; each start resumes the "
                            "run folder from its newest checkpoint.", min=0)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = opt("adamw", "Optimizer.")
    lr: float = opt(1e-3, "Peak learning rate.", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.0, "Weight decay (decoupled for adamw).", min=0.0)
    momentum: float = opt(0.9, "SGD momentum.", min=0.0, max=1.0)
    nesterov: bool = opt(False, "SGD Nesterov momentum.")
    label_smoothing: float = opt(0.0, "Label smoothing of the cross-entropy loss.", min=0.0, max=1.0)
    clip_grad_norm: Union[float, None] = opt(
        None, "Clip the gradients' total L2 norm to this value before each optimizer step (after they are reduced "
        "over ranks and, under 16-mixed, unscaled); the norm before clipping is logged (grad_norm); null = off.",
        min=0.0, min_exclusive=True)
    clip_grad_value: Union[float, None] = opt(
        None, "Clamp every gradient element to [-v, v] before each optimizer step (after the reduction and "
        "unscaling; before clip_grad_norm when both are set); null = off.", min=0.0, min_exclusive=True)
    no_decay_norm_bias: bool = opt(
        False, "No weight decay on biases and normalisation weights (every 1-D parameter), as timm's optimizers "
        "do by default.")
    layer_decay: Union[float, None] = opt(
        None, "Layer-wise learning-rate decay for fine-tuning: the k-th backbone stage below the new layers "
        "(layer4 = 1 ... stem) trains at lr x backbone_lr_scale x layer_decay^k, e.g. 0.75; null = off.",
        min=0.0, max=1.0, min_exclusive=True)
    accumulate: int = opt(
        1, "Gradient accumulation: one optimizer step per K batches of data.batch_size (the effective batch is "
        "K x batch_size); gradients are synchronised over ranks once per step, and the schedule, the weight "
        "average, logging and checkpoints count optimizer steps.", min=1)


@dataclass(frozen=True)
class SchedConfig:
    name: Literal["none", "cosine", "step", "onecycle"] = opt(
        "none", "Learning-rate schedule, stepped every batch.")
    warmup_epochs: float = opt(0.0, "cosine: linear warm-up length in epochs (may be fractional).", min=0.0)
    min_lr_ratio: float = opt(0.0, "cosine: final lr as a fraction of the peak.", min=0.0, max=1.0)
    step_size: int = opt(1, "step: epochs between lr drops.", min=1)
    gamma: float = opt(0.1, "step: lr multiplier at each drop.", min=0.0, min_exclusive=True)
    pct_start: float = opt(0.25, "onecycle: fraction of training spent rising to the peak.", min=0.0, max=1.0)
    div_factor: float = opt(25.0, "onecycle: initial lr = peak / div_factor.", min=1.0)
    final_div_factor: float = opt(1e4, "onecycle: final lr = initial lr / final_div_factor.", min=1.0)


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = opt(
        True, "Free each block's gathered parameters after its forward (gathered again for backward): least "
        "memory; false keeps them until backward (one all-gather fewer per block).")
    cpu_offload: bool = opt(
        False, "Keep the parameter, gradient and optimizer-state shards in CPU memory (the optimizer steps on "
        "the CPU): for models whose shards alone do not fit the GPU.")


@dataclass(frozen=True)
class MLflowSettings:
    tracking_uri: Union[str, None] = opt(
        None, "Where runs are logged: a folder, sqlite:///mlflow.db, http://host:5000 ...; null = the file store "
        "<out_dir>/mlruns.")
    experiment: Union[str, None] = opt(
        None, "Experiment name; null = the run's name (trainer tune: the tune experiment's name).")


@dataclass(frozen=True)
class WandbSettings:
    mode: Literal["auto", "offline", "online", "disabled"] = opt(
        "auto", "auto: online when an API key is configured (WANDB_API_KEY or wandb login), else offline - never "
        "a prompt; offline runs are uploaded later with 'wandb sync'.")
    project: str = opt("trainrig", "W&B project.")
    entity: Union[str, None] = opt(None, "W&B entity (team or user); null = your default.")
    tags: list[str] = opt([], "Tags on the W&B run.")


# ----------------------------------------------------------------------------- honest choices

_TEST_SET = "would choose on the test set, which is read once, for the final figure only; use"
_NEW = "(data.val_fraction holds out the validation split)"
REFUSED = {  # values that chose on the test set before trainrig had a validation split: key -> value -> why
    "checkpoint.monitor": {"test_acc": f"{_TEST_SET} checkpoint.monitor: val_acc {_NEW}",
                           "test_loss": f"{_TEST_SET} checkpoint.monitor: val_loss {_NEW}"},
    "early_stopping.monitor": {"test_acc": f"{_TEST_SET} early_stopping.monitor: val_acc {_NEW}",
                               "test_loss": f"{_TEST_SET} early_stopping.monitor: val_loss {_NEW}"},
    "tune.metric": {"accuracy": f"(the test accuracy) {_TEST_SET} tune.metric: val_acc {_NEW}",
                    "loss": f"(the test loss) {_TEST_SET} tune.metric: val_loss {_NEW}",
                    "test_acc": f"{_TEST_SET} tune.metric: val_acc {_NEW}",
                    "test_loss": f"{_TEST_SET} tune.metric: val_loss {_NEW}",
                    "train_accuracy": "is now called tune.metric: train_acc"},
}


def needs_validation(cfg: Any) -> list[str]:
    """The keys of ``cfg`` that read the validation split (each an error when there is none)."""
    return [f"{key}: {value}" for key, value in (
        ("checkpoint.monitor", cfg.checkpoint.monitor), ("early_stopping.monitor", cfg.early_stopping.monitor))
        if isinstance(value, str) and value.startswith("val_")]


def upgrade(raw: dict) -> dict:
    """A stored config of the format before validation splits (no early_stopping key) in today's keys."""
    if "early_stopping" in raw:
        return raw
    out = {**raw, "data": dict(raw.get("data") or {}), "checkpoint": dict(raw.get("checkpoint") or {}),
           "tune": dict(raw.get("tune") or {})}
    if out["data"].get("name") == "imagefolder":  # its val_fraction held out the set it tested on
        out["data"]["test_fraction"] = out["data"].get("val_fraction", 0.1) or 0.1
    out["data"]["val_fraction"] = 0.0
    out["checkpoint"]["monitor"] = "last" if str(out["checkpoint"].get("monitor", "test_acc")).startswith("test") \
        else out["checkpoint"]["monitor"]
    renamed = {"accuracy": "val_acc", "loss": "val_loss", "train_accuracy": "train_acc"}
    out["tune"]["metric"] = renamed.get(out["tune"].get("metric", "accuracy"), out["tune"].get("metric"))
    return out


@dataclass(frozen=True)
class AugmentSettings:
    resized_crop: Union[list[float], None] = opt(
        None, "RandomResizedCrop's scale range [min, max] of the image area kept, e.g. [0.35, 1.0], resized back to "
        "the image size; null = off.")
    policy: Literal["none", "randaugment", "trivialaugment", "autoaugment"] = opt(
        "none", "Automatic augmentation policy per image (torchvision.transforms.v2): RandAugment, "
        "TrivialAugmentWide or AutoAugment (ImageNet policy).")
    num_ops: int = opt(2, "randaugment: operations per image.", min=1)
    magnitude: int = opt(9, "randaugment: strength of every operation (0-30).", min=0, max=30)
    erasing: float = opt(0.0, "RandomErasing: probability that a rectangle of each normalised training image is "
                         "set to 0 (the mean); 0 = off.", min=0.0, max=1.0)
    mixup: float = opt(0.0, "MixUp's Beta(alpha, alpha) for the mixing weight; 0 = off. Targets become soft "
                       "(optim.label_smoothing still applies).", min=0.0)
    cutmix: float = opt(0.0, "CutMix's alpha; 0 = off. With mixup too, each batch takes one of the two at random.",
                        min=0.0)
    mix_prob: float = opt(1.0, "Fraction of training batches mixed (mixup / cutmix); the rest keep hard labels.",
                          min=0.0, max=1.0)


def augment_problems(cfg: Any) -> list[str]:
    """What the field types cannot say about ``data.augment``."""
    scale = cfg.data.augment.resized_crop
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        return [f"data.augment.resized_crop: expected [min, max] with 0 < min <= max <= 1, got {scale}"]
    return []
