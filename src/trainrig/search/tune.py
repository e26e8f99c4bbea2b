"""Hyperparameter search with Ray Tune: YAML search space -> trials that each call ``loop.fit``.

``run(cfg)`` starts (or joins) Ray, runs the search with the configured searcher and scheduler, and
writes into the experiment folder ``<storage_path>/<name>/``: ``best.yaml`` (a complete fit config),
``trials.csv`` (one row per trial) and ``trials.png`` (each trial's metric per epoch): results.py. The
search space is checked and converted in space.py.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainrig.training import checkpoint, choose
from trainrig import config as config_mod
from trainrig.training.callbacks import Callback
from trainrig.config import Config
from trainrig.errors import ConfigError
from trainrig.parallel.ray_train import start_ray
from trainrig.search.results import TuneResult, summarise
from trainrig.search.space import apply_params, ray_space, validate_space

REPORTED = ("val_acc", "val_loss", "train_acc", "train_loss")  # what Tune sees of an epoch: never a test metric


# ----------------------------------------------------------------------------- the trial

def _trial_folder() -> Path:
    """This trial's folder in the experiment. ``get_trial_dir()`` is right only for an actor's first
    trial: a reused actor (``reuse_actors``) is handed a scratch working folder that is never synced back,
    so where the experiment lives on a local (or shared) file system, ask the storage for the real one."""
    import pyarrow.fs
    from ray import tune

    context = tune.get_context()
    storage = context.get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(storage.trial_fs_path)
    return Path(context.get_trial_dir())


class TuneReport(Callback):
    """Reports each epoch's validation and training metrics (never a test metric: what Tune sees, ASHA, PBT,
    HyperOpt and best.yaml choose on) and last.pt to Ray Tune. It runs in the trial's own process (under
    spawned DDP rank 0's events are relayed to it), where Ray's session lives."""

    in_launcher = True

    def on_epoch_end(self, run: Any, row: dict) -> None:
        from ray import tune

        metrics = {key: row[key] for key in REPORTED if key in row}
        metrics["epoch"] = row["epoch"]
        # Ray copies the reported folder into the trial's checkpoint_N; hard links hand it last.pt (and the shard
        # folder of a sharded run) without writing them once more
        with tempfile.TemporaryDirectory(dir=run.run_dir, prefix=".report-") as tmp:
            checkpoint.copy_to(run.run_dir / "checkpoints" / "last.pt", Path(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _trial(params: dict[str, Any], base: dict) -> None:
    """One trial: the fit config with ``params`` set, trained by ``loop.fit`` (in this process, or as a
    DDP group of spawned processes with ``strategy: ddp``), reporting every epoch with a checkpoint so
    schedulers can stop it and a restored experiment can resume it."""
    from ray import tune

    from trainrig.parallel import strategy_class
    from trainrig.training.loop import fit

    trial_dir = _trial_folder()
    cfg = apply_params(config_mod.load(raw=base), params)
    ranks = strategy_class(cfg).processes(cfg)
    cfg = dataclasses.replace(cfg, out_dir=str(trial_dir), name="fit",
                              eval=dataclasses.replace(cfg.eval, test=False, test_every_epoch=False),  # best only
                              threads=max(1, int(cfg.tune.resources_per_trial.cpu) // ranks),
                              mlflow=dataclasses.replace(  # one MLflow experiment for the whole search
                                  cfg.mlflow, experiment=cfg.mlflow.experiment or cfg.tune.name,
                                  tracking_uri=cfg.mlflow.tracking_uri or (trial_dir.parent / "mlruns").as_uri()))
    restored, run_dir = tune.get_checkpoint(), trial_dir / "fit"
    if restored is not None:  # Ray's reported checkpoint is the trial's truth: later local saves go
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        with restored.as_directory() as folder:
            checkpoint.copy_to(Path(folder) / "last.pt", run_dir / "checkpoints")
    elif run_dir.exists():
        # Ray restarts this trial from scratch (interrupted before its first reported epoch): the
        # folder of that attempt holds nothing Ray kept, so it is replaced rather than left beside a fit-2
        print(f"trainrig: trial restarted from scratch; replacing its unreported attempt in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    fit(cfg, resume=restored is not None, progress="off", callbacks=[TuneReport()])


# ----------------------------------------------------------------------------- running

def _check_resources(cfg: Config) -> int:
    """Concurrent trials the cluster can hold; a GPU request where there is none is an error, not a hang."""
    import ray

    res, settings = ray.cluster_resources(), cfg.tune
    want = settings.resources_per_trial
    if want.gpu > 0 and res.get("GPU", 0) < want.gpu:
        raise ConfigError(f"tune.resources_per_trial.gpu={want.gpu} but the Ray cluster has "
                          f"{res.get('GPU', 0):g} GPUs; set it to 0 or join a cluster with GPUs (tune.address)")
    if res.get("CPU", 0) < want.cpu:
        raise ConfigError(f"tune.resources_per_trial.cpu={want.cpu} but the Ray cluster has {res.get('CPU', 0):g} CPUs")
    fits = math.floor(res.get("CPU", 0) / want.cpu)
    if want.gpu > 0:
        fits = min(fits, math.floor(res.get("GPU", 0) / want.gpu))
    return max(1, min(fits, settings.max_concurrent or fits))


def _hyperopt(settings: Any) -> Any:
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(n_initial_points=settings.n_initial_points, random_state_seed=settings.seed)


def _optuna(settings: Any) -> Any:
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("tune.searcher: optuna needs Optuna: pip install 'trainrig[tune]'") from None
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=settings.seed,
                                                           n_startup_trials=settings.n_initial_points))


MODEL_SEARCHERS = {"hyperopt": _hyperopt, "optuna": _optuna}  # TPE; random / grid: Ray's variant generator


def _searcher(cfg: Config, concurrency: int):
    settings = cfg.tune
    if settings.searcher not in MODEL_SEARCHERS:  # random / grid: Ray's variant generator, seeded
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=concurrency, random_state=settings.seed)
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(MODEL_SEARCHERS[settings.searcher](settings), max_concurrent=concurrency)


def pbt_mutations(cfg: Config) -> dict[str, tuple[str, Any]]:
    """tune.pbt.mutations (or the search space) checked like a search space; grid entries cannot mutate."""
    space = cfg.tune.pbt.mutations or cfg.tune.search_space
    parsed = validate_space(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, search_space=space,
                                                                               searcher="random")))
    for key, (dist, _) in parsed.items():
        if dist == "grid":
            raise ConfigError(f"tune.pbt.mutations.{key}: grid cannot mutate; use choice, uniform, loguniform ...")
    return parsed


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining

    s = cfg.tune
    rungs: dict[str, Any] = {"time_attr": "training_iteration", "max_t": s.max_t or cfg.epochs}
    if s.reduction_factor is not None:  # else Ray's own default for the scheduler
        rungs["reduction_factor"] = s.reduction_factor
    builders = {
        "fifo": lambda: FIFOScheduler(),
        "asha": lambda: ASHAScheduler(grace_period=s.grace_period, **rungs),
        "hyperband": lambda: HyperBandScheduler(**rungs),
        "pbt": lambda: PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.pbt.perturbation_interval,
            hyperparam_mutations=ray_space(pbt_mutations(cfg), "random"), quantile_fraction=s.pbt.quantile_fraction,
            resample_probability=s.pbt.resample_probability, synch=s.pbt.synch),
    }
    return builders[s.scheduler]()


def experiment_dir(cfg: Config) -> Path:
    return Path(cfg.tune.storage_path).resolve() / cfg.tune.name


def _check(cfg: Config, resume: bool) -> tuple[Config, dict[str, tuple[str, Any]], Path]:
    """Everything checked before Ray starts: the metric (and its validation split), the search space, PBT's
    mutations, the experiment folder. Returns the config with tune.mode resolved, the space and the folder."""
    metric = cfg.tune.metric
    if metric.startswith("val_") and not cfg.data.val_fraction and cfg.data.name != "imagefolder":
        raise ConfigError(f"tune.metric: {metric} needs a validation split, but data.val_fraction is 0")
    mode = cfg.tune.mode if cfg.tune.mode != "auto" else ("max" if choose.maximize(metric) else "min")
    cfg = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, mode=mode))
    parsed = validate_space(cfg)
    if cfg.tune.scheduler == "pbt":
        if cfg.tune.searcher in MODEL_SEARCHERS:
            raise ConfigError(f"tune.scheduler: pbt explores by itself; set tune.searcher: random (or grid), not "
                              f"{cfg.tune.searcher}")
        pbt_mutations(cfg)
    exp_dir = experiment_dir(cfg)
    if resume and not exp_dir.is_dir():
        raise ConfigError(f"--resume: no experiment at {exp_dir}")
    if not resume and exp_dir.exists() and any(exp_dir.iterdir()):
        raise ConfigError(f"{exp_dir} already holds an experiment; continue it with --resume or set tune.name")
    return cfg, parsed, exp_dir


def run(cfg: Config, *, resume: bool = False, verbose: bool = True) -> TuneResult:
    """Run (or with ``resume`` continue) the search in ``cfg.tune`` and write the experiment's files."""
    cfg, parsed, exp_dir = _check(cfg, resume)

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # so the CLIReporter table below is used
    try:
        from ray import tune
    except ImportError:
        raise ConfigError("trainer tune needs Ray Tune: pip install 'trainrig[tune]'") from None

    start_ray(cfg.tune.address, cfg.tune.object_store_mb)
    concurrency = _check_resources(cfg)
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(concurrency)
    res = cfg.tune.resources_per_trial
    trainable = tune.with_resources(tune.with_parameters(_trial, base=config_mod.to_dict(cfg)),
                                    {"cpu": res.cpu, "gpu": res.gpu})
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        reporter = tune.CLIReporter(parameter_columns=list(parsed), metric_columns=["epoch", *REPORTED[:2]],
                                    max_report_frequency=10, print_intermediate_tables=verbose)
        tuner = tune.Tuner(
            trainable,
            param_space=ray_space(parsed, cfg.tune.searcher),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                        search_alg=_searcher(cfg, concurrency), scheduler=_scheduler(cfg),
                                        max_concurrent_trials=concurrency, reuse_actors=cfg.tune.reuse_actors),
            run_config=tune.RunConfig(name=cfg.tune.name, storage_path=str(exp_dir.parent), verbose=1 if verbose else 0,
                                      progress_reporter=reporter,
                                      checkpoint_config=tune.CheckpointConfig(  # PBT restores other trials: keep more
                                          num_to_keep=4 if cfg.tune.scheduler == "pbt" else 1),
                                      failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)),
        )
    grid = tuner.fit()  # Ctrl-C: Ray saves the experiment state and returns the trials so far
    return summarise(cfg, grid, exp_dir, expected=expected_trials(cfg, parsed))


def expected_trials(cfg: Config, parsed: dict[str, tuple[str, Any]]) -> int:
    """Trials a complete search runs: num_samples for each combination of the grid entries."""
    grids = [len(args) for dist, args in parsed.values()
             if dist == "grid" or (dist == "choice" and cfg.tune.searcher == "grid")]
    return cfg.tune.num_samples * math.prod(grids)


__all__ = ["run", "validate_space", "apply_params", "ray_space", "TuneResult", "experiment_dir"]
