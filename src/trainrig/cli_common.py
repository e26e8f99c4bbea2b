"""What every ``trainer`` command shares: the app, the consoles, the common options, the error handling."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from trainrig import config as config_mod
from trainrig.errors import RunFailed, TrainrigError
from trainrig.training.preempt import Preempted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train vision models from one YAML file.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")
out = Console()
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (default: the packaged FashionMNIST ResNet18).")
SetOpt = typer.Option([], "--set", "-s", help="Override one key, e.g. --set optim.lr=3e-4 (repeatable).")
TTAOpt = typer.Option(None, "--tta", help="Test-time augmentation: none | flip (default: the run's eval.tta).")
TrustOpt = typer.Option(False, "--trust-class-path", help="Import the model.class_path named in the checkpoint's "
                        "config (importing a module runs its code: only for files you trust).")


def user_errors(fn: Callable) -> Callable:
    """Bad input -> one line on stderr and exit code 2, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrainrigError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except RunFailed as exc:  # a DDP rank raised or stalled: its traceback/stacks are above or in log.txt
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Preempted as exc:  # a checkpoint was written; exit as the signal would have ended us
            if exc.message:
                err.print(escape(exc.message), highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            err.print(f"interrupted{': ' + escape(str(exc)) if str(exc) else ''}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    return wrapper


def _load(config: Optional[Path], overrides: List[str]) -> config_mod.Config:
    return config_mod.load(config if config is not None else config_mod.default_config_path(), overrides)


def _short(value: object, width: int = 24) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _si(n: float) -> str:
    """1234567 -> '1.23 M': FLOP counts at a glance."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} "


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"
