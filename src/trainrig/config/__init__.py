"""Typed run configuration: defaults -> YAML -> ``--set`` overrides, validated once.

Every key lives in a frozen dataclass below with a default and a help text (``metadata["help"]``),
which doubles as the reference printed by ``trainer config keys``. Unknown keys are errors that name
the closest valid key; every problem found is collected into one :class:`ConfigError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from trainrig.config.convert import convert as _convert, load_yaml
from trainrig.errors import ConfigError
from trainrig.config.settings import (REFUSED, AugmentSettings, CheckpointConfig, EarlyStopping, EvalConfig,
                                      FSDPSettings, OptimConfig, SchedConfig, augment_problems,
                                      MLflowSettings, RaySettings, TuneSettings, WandbSettings, needs_validation,
                                      opt, upgrade)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["fashion_mnist", "mnist", "kmnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = opt(
        "fashion_mnist", "Dataset, read from data.root in its own file format: the MNIST family (IDX files), "
        "CIFAR (python or binary version), imagefolder (your images, one folder per class) or synthetic.")
    root: str = opt("data", "Where the dataset lives. imagefolder: root/train/<class>/* + root/val/<class>/* "
                    "(or test/), or root/<class>/* split by val_fraction. Others: their files (torchvision's "
                    "download lands here when they are missing and the network is there).")
    val_fraction: float = opt(
        0.1, "Fraction of each class of the training images held out as the validation split, which every choice "
        "reads (best.pt, top-k, early stopping, tune); the same images on every rank, trial, resume and machine "
        "(a function of seed and the labels). A source with its own validation set (imagefolder root/val) uses "
        "that. 0 = no validation split: then checkpoint.monitor must be train_* or last, and early stopping and "
        "tune cannot run.", min=0.0, max=0.9)
    test_fraction: float = opt(
        0.1, "imagefolder without root/test: fraction of each class held out as the test set (read once, at the "
        "end). Other sources have their own test set.", min=0.0, max=0.9, min_exclusive=True)
    image_size: Union[int, None] = opt(
        None, "Images are resized (shorter side, then a centre square crop) to this side; null = the dataset's "
        "own size (imagefolder: the first training image's shorter side). Filled in the run's config.", min=8)
    batch_size: Union[int, Literal["auto"]] = opt(
        128, "Training batch size (the global batch once several processes train); auto = the largest that "
        "fits, found by real training steps, less auto_batch_margin.", min=1)
    auto_batch_margin: float = opt(0.1, "batch_size auto: fraction kept free below the largest batch that ran.",
                                   min=0.0, max=0.9)
    eval_batch_size: int = opt(1024, "Batch size for evaluation (no gradients, so it can be larger).", min=1)
    subset: Union[int, None] = opt(
        None, "Train on the first N training images only (quick runs); null = all.", min=1)
    test_subset: Union[int, None] = opt(
        None, "Evaluate on the first N test images only; null = all.", min=1)
    normalize: bool = opt(True, "Subtract the per-channel mean and divide by the std (on whole batches).")
    mean: Union[list[float], None] = opt(
        None, "Per-channel mean of the [0, 1] pixels; null = computed from the training set (ImageNet's with "
        "model.weights: imagenet). Filled in the run's config.")
    std: Union[list[float], None] = opt(None, "Per-channel std, like data.mean.")
    classes: Union[list[str], None] = opt(
        None, "Class names, index = label; null = the dataset's (imagefolder: folder names). Filled in the run's "
        "config; trainer predict prints them.")
    flip: bool = opt(False, "Random horizontal flip of training batches.")
    crop_padding: int = opt(0, "Random crop after zero-padding by this many pixels (0 = off).", min=0)
    augment: AugmentSettings = opt(
        AugmentSettings(), "More training augmentation (torchvision.transforms.v2): random resized crop, an "
        "automatic policy, random erasing, mixup / cutmix. Every draw is a function of (seed, epoch, rank, batch).")
    loader: Literal["auto", "memory", "dataloader"] = opt(
        "auto", "auto: decode once into memory when it fits data.cache_mb, else a DataLoader decodes per batch; "
        "memory / dataloader: force one. The run's first line says which was taken.")
    cache_mb: Union[int, None] = opt(
        None, "Most MiB of decoded images kept in memory (train + test); null = half the available RAM divided "
        "by the processes on this machine.", min=0)
    num_workers: Union[int, None] = opt(
        None, "DataLoader worker processes; null = none for in-memory tensors, else this process's cores (<= 4).",
        min=0)
    pin_memory: bool = opt(False, "Pin host memory for faster copies to CUDA (DataLoader path only).")
    synthetic_train: int = opt(2048, "Number of synthetic training images.", min=1)
    synthetic_test: int = opt(512, "Number of synthetic test images.", min=1)


@dataclass(frozen=True)
class EMASettings:
    decay: Union[float, None] = opt(
        None, "Exponential moving average of the weights and BatchNorm buffers, e.g. 0.999 (per update); null = "
        "off. When on, evaluation, best.pt, predict and export use the averaged weights. The n-th update uses "
        "min(decay, (1 + n) / (10 + n)), so the first weights fade fast.", min=0.0, max=1.0, min_exclusive=True)
    every_n_steps: int = opt(1, "Optimizer steps between updates of the average.", min=1)
    start_epoch: int = opt(0, "Epochs trained before the average starts (a copy of the weights then); until "
                           "then evaluation uses the trained weights.", min=0)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = opt("resnet18", "Any torchvision classification model (torchvision.models.list_models), or "
                    "timm/<name> with timm installed (pip install 'trainrig[timm]').")
    class_path: Union[str, None] = opt(
        None, "Your own network instead of arch: package.module.Class, built with init_args; it takes "
        "(N, C, H, W) images and returns (N, num_classes) logits.")
    init_args: dict = opt({}, "Keyword arguments for class_path.")
    weights: Union[str, None] = opt(
        None, "null (random init) | imagenet (torchvision's / timm's pretrained weights) | path to a state_dict file.")
    in_channels: Union[int, None] = opt(
        None, "Input channels (images are converted: RGB->grey or grey repeated); null = the dataset's. Another "
        "count than the network's replaces its first convolution.", min=1)
    num_classes: Union[int, None] = opt(
        None, "Output classes (a new classifier head is built); null = the dataset's number of classes.", min=2)
    conv1_init: Literal["xavier", "fold"] = opt(
        "xavier", "New first conv init: xavier (source notes) or fold (sum pretrained RGB kernels, keeps features).")
    finetune: Literal["full", "frozen", "gradual"] = opt(
        "full", "full: train everything; frozen: only the new first conv and the head; gradual: unfreeze the "
        "backbone's stages, deepest first, one every unfreeze_every epochs.")
    unfreeze_every: int = opt(1, "gradual: epochs between unfreezing the next backbone stage.", min=1)
    backbone_lr_scale: float = opt(
        1.0, "Learning-rate multiplier for pretrained backbone parameters (new layers use optim.lr).", min=0.0)
    stem_pool: bool = opt(True, "Keep the max-pool after the first conv (ResNet family); false keeps twice the "
                          "resolution through the network: more accurate on small images like 28x28, more compute.")
    channels_last: bool = opt(True, "Use the channels_last memory format (faster convolutions on CPU and GPU).")
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = opt(
        False, "torch.compile the network in place (its state_dict keeps its names: no _orig_mod. in checkpoints, "
        "EMA, export or predict) with this mode; true = default. The first steps compile (the time is logged "
        "once); needs a C++ compiler on the CPU. Not with strategy fsdp or model_parallel.")
    ema: EMASettings = opt(EMASettings(), "Moving average of the weights (model.ema.decay turns it on).")


@dataclass(frozen=True)
class Config:
    name: str = opt("fashion_resnet18", "Run name: the run folder is <out_dir>/<name> (a plain folder name).")
    out_dir: str = opt("runs", "Parent folder of run folders.")
    seed: int = opt(0, "Seed for weights, batch order and augmentation.", min=0, max=2**32 - 1)
    resume: Literal["never", "auto"] = opt(
        "never", "auto: continue <out_dir>/<name> from its last checkpoint when it has one, else start it there - "
        "one command for the first launch and every restart (job scripts); never: a new run folder each time. "
        "trainer fit --resume is the strict form (the checkpoint must exist).")
    epochs: int = opt(5, "Number of training epochs.", min=1)
    device: str = opt("auto", "auto (CUDA if present, else CPU) | cpu | cuda | cuda:N.")
    threads: int = opt(0, "torch.set_num_threads for CPU work; 0 = the cores this process may use (taskset, cpuset) "
                          "divided among local processes.", min=0)
    precision: Literal["32", "16-mixed", "bf16-mixed", "64-true"] = opt(
        "32", "32 | 16-mixed (autocast fp16 + GradScaler) | bf16-mixed (autocast bf16): less activation memory; on a CPU "
        "without AVX512/AMX (fp16: AVX512-FP16/AMX-FP16) 10x or more slower than 32, and the log warns | "
        "64-true (float64 weights and inputs: slow, for checking that two ways of computing agree).")
    grad_checkpointing: bool = opt(
        False, "Recompute each backbone block's activations in backward instead of storing them: less memory, "
        "more time.")
    launcher: Literal["local", "ray"] = opt(
        "local", "local: processes on this machine (spawned here, or torchrun's); ray: strategy ddp or fsdp as Ray Train "
        "workers on a Ray cluster (ray.*; out_dir and data.root must then be folders every node sees).")
    strategy: Literal["single", "dp", "ddp", "fsdp", "model_parallel"] = opt(
        "single", "single device | dp (nn.DataParallel) | ddp (DistributedDataParallel) | fsdp (FSDP2: "
        "parameters, gradients and optimizer state sharded over the ranks) | model_parallel (stages; "
        "torchvision ResNets).")
    devices: Union[int, Literal["auto"], list[str]] = opt(
        "auto", "auto | N | [list]. ddp, fsdp: processes (auto = every local GPU, else 2 CPU processes); dp: GPUs; "
        "model_parallel: one device per stage, e.g. [cuda:0, cuda:1] or [cpu, cpu].")
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "ddp / fsdp process-group backend; auto = nccl on CUDA, gloo on CPU.")
    restarts: int = opt(
        0, "ddp / fsdp spawned by trainer: times the whole group is restarted from the newest checkpoint after a rank "
        "dies (under torchrun use --max-restarts and --resume auto instead).", min=0)
    dist_timeout_s: float = opt(
        300.0, "The watchdog: a process that makes no progress (no training step, evaluation batch or epoch "
        "end) this many seconds ends the run, naming the rank and where it waited, its stacks in log.txt; "
        "ddp collectives time out 30 s later, and a torchrun group forms within it or fails.", min=1.0)
    split_at: list[str] = opt(
        ["layer3"], "model_parallel: ResNet stages that start a new device (len = devices - 1).")
    split_size: Union[int, None] = opt(
        None, "model_parallel: micro-batch size for pipelining (stage k runs micro-batch i while k-1 runs i+1); "
        "null = no pipelining.", min=1)
    fsdp: FSDPSettings = opt(FSDPSettings(), "strategy: fsdp - how the shards are kept.")
    data: DataConfig = opt(DataConfig(), "Dataset and batching.")
    eval: EvalConfig = opt(EvalConfig(), "How the validation and test sets (and predict's images) are evaluated.")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "When checkpoints are written and which are kept.")
    early_stopping: EarlyStopping = opt(EarlyStopping(), "Stop when a validation metric stops improving.")
    model: ModelConfig = opt(ModelConfig(), "Network and transfer-learning surgery.")
    optim: OptimConfig = opt(OptimConfig(), "Optimizer and loss.")
    sched: SchedConfig = opt(SchedConfig(), "Learning-rate schedule.")
    loggers: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = opt(
        ["csv"], "Where metrics go: csv (metrics.csv, steps.csv), tensorboard (<run>/tensorboard), mlflow, wandb; "
        "each but csv is an extra: pip install 'trainrig[loggers]'.")
    log_every_n_steps: int = opt(50, "Loggers record the training loss and lr every N steps (epoch metrics always).",
                                 min=1)
    mlflow: MLflowSettings = opt(MLflowSettings(), "MLflow logger (loggers: [mlflow]).")
    wandb: WandbSettings = opt(WandbSettings(), "Weights & Biases logger (loggers: [wandb]).")
    callbacks: list[dict] = opt(
        [], "Extra callbacks, each {class_path: package.module.Class, init_args: {...}}: a subclass of "
        "trainrig.training.callbacks.Callback, imported (never evaluated) and run after the built-in ones.")
    ray: RaySettings = opt(RaySettings(), "launcher: ray - the Ray cluster and its workers.")
    tune: TuneSettings = opt(TuneSettings(), "Hyperparameter search with Ray Tune (trainer tune).")


def _validation_problems(cfg: "Config") -> list[str]:
    if cfg.data.val_fraction or cfg.data.name == "imagefolder":  # imagefolder: root/val may exist (data checks)
        return []
    return [f"{key} needs a validation split, but data.val_fraction is 0" for key in needs_validation(cfg)]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_range(path: str, value: Any, meta: dict, problems: list[str]) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        bound = f"> {lo}" if meta.get("min_exclusive") else f">= {lo}"
        problems.append(f"{path}: expected a value {bound}, got {value!r}")
    if hi is not None and value > hi:
        problems.append(f"{path}: expected a value <= {hi}, got {value!r}")


def _unknown(path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{_join(path, close[0])}'?" if close else f"; valid keys: {', '.join(valid)}"
    return f"{_join(path, key)}: unknown key{hint}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type, raw: Any, path: str, problems: list[str], from_text: bool) -> Any:
    """Merge ``raw`` (a dict of overrides) onto the defaults of ``cls``, collecting problems."""
    base = cls()
    if raw is None:
        return base
    if not isinstance(raw, dict):
        problems.append(f"{path or 'config'}: expected a mapping of keys, got {raw!r}")
        return base
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key not in fields:
            problems.append(_unknown(path, key, list(fields)))
            continue
        tp, full = hints[key], _join(path, key)
        if isinstance(value, str) and value in REFUSED.get(full, {}):
            problems.append(f"{full}: {value} {REFUSED[full][value]}")
            continue
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, full, problems, from_text)
            continue
        try:
            values[key] = _convert(value, tp, from_text)
        except ValueError as exc:
            problems.append(f"{full}: {exc}, got {value!r}")
            continue
        _check_range(full, values[key], fields[key].metadata, problems)
    return dataclasses.replace(base, **values)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["optim.lr=3e-4", "data.flip=true"]`` into a nested dict of raw strings."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is set twice")
            node = child
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (safe loader, duplicate keys refused); every error names the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is expected)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return raw


def default_config_path() -> Path:
    """The packaged default config (the main job: ResNet18 on real FashionMNIST)."""
    return Path(__file__).parent.parent / "configs" / "fashion_resnet18.yaml"


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         raw: dict | None = None) -> Config:
    """Resolve defaults -> YAML file (or ``raw`` dict) -> ``--set`` overrides into one Config.

    All problems (unknown keys, wrong types, values out of range) are reported together.
    """
    source = dict(raw) if raw is not None else (read_yaml(path) if path is not None else {})
    problems: list[str] = []
    file_cfg = _build(Config, source, "", problems, from_text=False)
    problems += _value_problems(file_cfg) if not problems else []
    if problems:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + "; ".join(problems))
    if overrides:
        merged = _deep_merge(to_dict(file_cfg), parse_overrides(overrides))
        cfg = _build(Config, merged, "", problems, from_text=True)
        problems += _value_problems(cfg) if not problems else []
        if problems:
            raise ConfigError("--set: " + "; ".join(problems))
        return cfg
    return file_cfg


def _value_problems(cfg: Config) -> list[str]:
    """What the field types cannot say, checked once the types are right."""
    return _folder_names(cfg) + _validation_problems(cfg) + augment_problems(cfg)


NAME_BYTES = 200  # a folder name's limit is 255 bytes on common file systems; room is left for "-2", ".tmp" ...


def _folder_names(cfg: Config) -> list[str]:
    """name and tune.name become folders under out_dir / storage_path: plain names only, never paths, short
    enough for any file system; no string anywhere holds a NUL (no file name or path can)."""
    problems = [f"{key}: expected a plain folder name (no '/', not '.' or '..'), got {value!r}"
                for key, value in (("name", cfg.name), ("tune.name", cfg.tune.name))
                if not value.strip() or "/" in value or "\\" in value or value in (".", "..")]
    problems += [f"{key}: a folder name of at most {NAME_BYTES} bytes, got {len(value.encode())}"
                 for key, value in (("name", cfg.name), ("tune.name", cfg.tune.name))
                 if len(value.encode()) > NAME_BYTES]
    problems += [f"{key}: control characters (here {next(c for c in value if ord(c) < 32)!r}) cannot be in a "
                 f"name or path, got {value!r}" for key, value in _strings(to_dict(cfg))
                 if any(ord(c) < 32 for c in value) and (key in ("name", "tune.name") or "\x00" in value)]
    return problems


def _strings(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every string value of a config dict with its dotted key (list items as key[i])."""
    if isinstance(tree, str):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [pair for k, v in tree.items() for pair in _strings(v, _join(prefix, str(k)))]
    if isinstance(tree, list):
        return [pair for i, v in enumerate(tree) for pair in _strings(v, f"{prefix}[{i}]")]
    return []


def from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Rebuild a Config from a dict stored by trainrig (a checkpoint's, a tune trial's): one written before
    the validation split existed is read as it trained - no validation split, best = the last epoch."""
    return load(raw=upgrade(raw), overrides=overrides)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The fully resolved config as YAML; loading this text alone reproduces the run."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
