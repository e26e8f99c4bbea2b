"""launcher: ray - the same DDP fit as a Ray Train ``TorchTrainer`` on a Ray cluster.

Ray places ``ray.num_workers`` workers (a GPU each with ``ray.use_gpu``), sets RANK / WORLD_SIZE /
LOCAL_RANK and the process group up, and restarts the whole group after a failure (``ray.max_failures``).
Each worker runs the ordinary fit worker, which joins Ray's group as it joins torchrun's (launch.py);
the run folder is pinned before the first start and every start resumes it from its newest checkpoint, so
a restarted group loses only the work since the last save. We write no cluster code: placement, process
groups and restarts are Ray Train's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from trainrig.training import checkpoint
from trainrig.training.callbacks import Callback
from trainrig.config import Config
from trainrig.errors import ConfigError, TrainrigError
from trainrig.machine import usable_cpus
from trainrig.parallel import STRATEGIES, run_workers, strategy_class
from trainrig.parallel.launch import WorkerFailed
from trainrig.training.preempt import STOP_FILE, Preempted, on_stop_signals, signal_name, stop_message
from trainrig.parallel.base import group_timeout


def start_ray(address: str | None, object_store_mb: int = 256, *, log_to_driver: bool = False) -> None:
    """Join ``address`` (``auto``: the cluster ``ray start`` made on this machine; ray://host:10001) or start
    a small local Ray (once per process; later calls do nothing). Shared by trainer tune and launcher: ray."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=log_to_driver, configure_logging=True,
                                  logging_level="ERROR")
    if address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"address {address!r}: no Ray cluster to join there ({exc}); start one with "
                              f"'ray start --head' or leave the address null for a local Ray") from None
    else:
        ray.init(address="local", num_cpus=usable_cpus(), object_store_memory=object_store_mb * 2**20,
                 **kwargs)  # "local": a new Ray of our own, never one an address file points at


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: the fit worker in the group Ray set up; rank 0 reports its result."""
    import ray.train

    try:
        result = run_workers(config["cfg"], config["worker"], config["callbacks"])
    except Preempted:  # stopped and saved as asked (the driver's STOP file): not a failure for Ray to retry;
        result = None  # the driver knows it asked and reads where the run stopped from the run folder
    # A barrier: every worker reports. Ray Train (v2) hands the driver only metrics reported with a
    # checkpoint, so these stay in the workers' logs; the driver reads the run's result from the run folder.
    ray.train.report({} if result is None else {
        "test_acc": result.test_acc, "best_epoch": result.best_epoch,
        "checksums": list(result.param_checksums)})


def _backend(cfg: Config) -> str:
    """The workers' backend: decided by where they run (a GPU each with ray.use_gpu), not by the driver's
    machine, which may have no GPU."""
    return cfg.backend if cfg.backend != "auto" else "nccl" if cfg.ray.use_gpu else "gloo"


def _check(cfg: Config, callbacks: Sequence[Callback]) -> None:
    if not strategy_class(cfg).group:
        groups = " or ".join(name for name, cls in STRATEGIES.items() if cls.group)
        raise ConfigError(f"launcher: ray runs a process group ({groups}) on Ray's workers; strategy: "
                          f"{cfg.strategy} is not one")
    if any(cb.in_launcher for cb in callbacks):
        raise ConfigError("launcher: ray: callbacks with in_launcher = True have no launcher process to run in")


def fit_on_ray(cfg: Config, worker: Callable, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """Run ``worker`` (resuming its run folder, see module doc) on ``ray.num_workers`` Ray Train workers;
    returns rank 0's report."""
    _check(cfg, callbacks)
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise ConfigError("launcher: ray needs Ray Train: pip install 'trainrig[tune]'") from None
    start_ray(cfg.ray.address, log_to_driver=True)  # the workers' progress lines show here
    settings = cfg.ray
    storage = settings.storage_path or str(Path(cfg.out_dir).resolve() / cfg.name / "ray")
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "worker": worker, "callbacks": list(callbacks)},
        torch_config=TorchConfig(backend=_backend(cfg), timeout_s=int(group_timeout(cfg).total_seconds())),
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=dict(settings.resources_per_worker) or None),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=settings.max_failures)),
    )
    run_dir = Path(cfg.out_dir) / cfg.name
    try:
        with _stop_file_on_signal(run_dir) as asked:
            result = trainer.fit()
    except TrainrigError:
        raise
    except Exception as exc:  # Ray wraps a worker's error; keep its last line
        text = str(exc).strip().splitlines()
        cause = next((line for line in reversed(text) if "Error" in line), text[-1] if text else repr(exc))
        raise WorkerFailed(f"launcher: ray: the worker group failed: {cause.strip()}") from None
    if asked:
        _raise_if_stopped(cfg, run_dir, asked[0])
    return dict(result.metrics or {})


def _raise_if_stopped(cfg: Config, run_dir: Path, signum: int) -> None:
    """After the driver asked the ranks to stop: Preempted, unless the run had finished all its epochs."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise Preempted(f"stopped by {signal_name(signum)} before training began: nothing to save", signum)
    saved = checkpoint.load(last, mmap=True)
    if int(saved["epoch"]) < cfg.epochs:
        raise Preempted(stop_message(signum, int(saved["epoch"]), int(saved.get("batch", 0)),
                                     int(saved["global_step"]), last), signum)


@contextlib.contextmanager
def _stop_file_on_signal(run_dir: Path) -> Iterator[list[int]]:
    """SIGTERM / SIGUSR1 to the driver become a STOP file in the run folder (preempt.py): Ray's workers run
    elsewhere and train in a thread, where no signal handler can be set; rank 0 reads the file. Yields the
    signals received."""
    def ask(signum: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP_FILE).write_text(signal_name(signum).removeprefix("SIG") + "\n")
    with on_stop_signals(ask) as asked:
        try:
            yield asked
        finally:
            if asked:  # honoured (the ranks saved and stopped) or too late (the run had ended): done either way
                (run_dir / STOP_FILE).unlink(missing_ok=True)
