"""``trainer lr-find``, ``trainer summary``, ``trainer profile``: the questions before a long run
(trainrig.preflight), each one command that loads config, calls one library function and renders the result."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from trainrig.cli_common import ConfigOpt, SetOpt, _load, _si, app, out, user_errors


@app.command("lr-find")
@user_errors
def lr_find_cmd(config: Optional[Path] = ConfigOpt, set_: List[str] = SetOpt,
                steps: int = typer.Option(100, "--steps", help="Optimizer steps of the sweep (at most).", min=5),
                min_lr: float = typer.Option(1e-7, "--min-lr", help="The sweep's first lr."),
                max_lr: float = typer.Option(10.0, "--max-lr", help="The sweep's last lr."),
                apply: bool = typer.Option(False, "--apply", help="Also write lr_find.yaml: the config with optim.lr "
                                           "set to the suggestion (the given file is left as it is).")) -> None:
    """Learning-rate range test: loss against an exponentially rising lr, lr_find.png, a suggested optim.lr."""
    from trainrig.preflight.lr_find import lr_find

    found = lr_find(_load(config, set_), steps=steps, min_lr=min_lr, max_lr=max_lr, apply=apply)
    if found is None:  # a non-zero rank under torchrun
        return
    out.print(f"suggested optim.lr: {found.suggestion:.3g} (valley rule over {len(found.lrs)} steps, lr "
              f"{found.lrs[0]:.3g} to {found.lrs[-1]:.3g}); plot {found.plot}", highlight=False, soft_wrap=True)
    if found.config is not None:
        out.print(f"wrote {found.config}: trainer fit --config {found.config}", highlight=False, soft_wrap=True)


@app.command("summary")
@user_errors
def summary_cmd(config: Optional[Path] = ConfigOpt, set_: List[str] = SetOpt,
                epoch: int = typer.Option(0, "--epoch", help="What trains at this epoch (0-based) of the "
                                          "model.finetune / unfreeze_every schedule.", min=0),
                depth: int = typer.Option(1, "--depth", help="Show modules down to this many levels.", min=1)) -> None:
    """The network: per module its output shape, parameters (trainable or frozen), FLOPs; memory estimate."""
    from trainrig.preflight.summary import summary

    found = summary(_load(config, set_), epoch=epoch, depth=depth)
    table = Table(title=f"{found.input[0]}x{found.input[1]}x{found.input[2]} input, epoch {found.epoch}")
    for column in ("module", "kind", "output", "params", "trainable", "FLOPs / image"):
        table.add_column(column, justify="left" if column in ("module", "kind") else "right")
    for r in found.rows:
        trains = "yes" if r.trainable == r.params and r.params else ("frozen" if r.params and not r.trainable
                                                                    else f"{r.trainable:,}" if r.params else "")
        table.add_row(r.name, r.kind, "x".join(map(str, r.output)), f"{r.params:,}", trains, _si(r.flops))
    out.print(table)
    mib = 2 ** 20
    out.print(f"parameters {found.params:,} ({found.trainable:,} trainable, {found.frozen:,} frozen); forward "
              f"{_si(found.flops)}FLOPs per image (a training step ~3x); memory at batch {found.batch_size}, "
              f"precision {found.precision}: weights + gradients + optimizer state {found.weight_bytes / mib:,.0f} "
              f"MiB, activations ~{found.activation_bytes / mib:,.0f} MiB", highlight=False, soft_wrap=True)


@app.command("profile")
@user_errors
def profile_cmd(config: Optional[Path] = ConfigOpt, set_: List[str] = SetOpt,
                steps: int = typer.Option(10, "--steps", help="Training steps profiled (after the warm-up).", min=1),
                warmup: int = typer.Option(3, "--warmup", help="Steps before profiling (compiling, caches; "
                                           "the last one also records the profiler's own start).", min=2),
                peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="The device's peak TFLOP/s "
                                                            "for model FLOPs utilisation, when trainrig does not "
                                                            "know it (CPUs).")) -> None:
    """torch.profiler over a few training steps: trace.json, top operators, data wait, FLOP/s."""
    from trainrig.preflight.profile import describe, profile

    found = profile(_load(config, set_), steps=steps, warmup=warmup,
                    peak_flops=peak_tflops * 1e12 if peak_tflops else None)
    if found is None:
        return
    out.print(escape(found.table), highlight=False, soft_wrap=True)
    out.print(escape(describe(found)), highlight=False, soft_wrap=True)
