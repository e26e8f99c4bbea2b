"""The ``trainer`` command line: each command loads config, calls one library function, renders the result.
The commands for before a long run (lr-find, summary, profile) are in cli_preflight.py."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from trainrig import config as config_mod
from trainrig.cli_common import (ConfigOpt, SetOpt, TTAOpt, TrustOpt, _load, _pct, _short, app, config_app, err,
                                 out, user_errors)
from trainrig.config import reference


@app.command()
@user_errors
def fit(config: Optional[Path] = ConfigOpt, set_: List[str] = SetOpt,
        resume: bool = typer.Option(False, "--resume", help="Continue the run folder <out_dir>/<name> from last.pt; "
                                    "'--resume auto': continue it if it has a checkpoint, else start it."),
        resume_mode: Optional[str] = typer.Argument(None, hidden=True, metavar="[auto]"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output, only the summary."),
        batch_size: Optional[str] = typer.Option(None, "--batch-size", help="Shortcut for --set data.batch_size=N|auto "
                                                                            "(auto: the largest that fits)."),
        init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of this "
                                                 "checkpoint (e.g. a tune trial's last.pt): --set model.weights=PATH.")
        ) -> None:
    """Train a model as the config says; results go to <out_dir>/<name>/."""
    from trainrig.training.loop import fit as run_fit

    shortcuts = [*([f"data.batch_size={batch_size}"] if batch_size is not None else []),
                 *([f"model.weights={init_from}"] if init_from is not None else [])]
    cfg = _load(config, [*set_, *shortcuts])
    if resume_mode not in (None, "auto") or (resume_mode and not resume):
        raise config_mod.ConfigError(f"unexpected argument {resume_mode!r} (did you mean --resume auto?)")
    result = run_fit(cfg, resume="auto" if resume_mode else resume, progress="off" if quiet else "auto")
    if result is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    out.print(fit_table(result))
    monitor = result.config.checkpoint.monitor
    stopped = f"; early stopping after epoch {result.stopped_early}" if result.stopped_early else ""
    tested = (f"test accuracy of its checkpoint {_pct(result.test_acc)} (seed {result.config.seed}, test set read "
              f"once)" if result.test else "the test set not evaluated (eval.test: false)")
    out.print(f"chosen by {monitor}: epoch {result.best_epoch}{stopped}; {tested}; run folder {result.run_dir} "
              f"(report.html, eval.json, metrics.csv, curves.png, checkpoints/)")


def fit_table(result) -> Table:
    """One line per epoch; the chosen one in green; test columns only with eval.test_every_epoch."""
    table = Table(title=f"{result.config.name}: {len(result.history)} epochs in {result.seconds / 60:.1f} min")
    splits = [s for s in ("train", "val", "test") if result.history and f"{s}_loss" in result.history[0]]
    columns = ["epoch", *(f"{s} {m}" for s in splits for m in ("loss", "acc")), "lr", "img/s", "s"]
    for col in columns:
        table.add_column(col, justify="right")
    for r in result.history:
        style = "bold green" if r["epoch"] == result.best_epoch else None
        cells = [c for s in splits for c in (f"{r[f'{s}_loss']:.4f}", _pct(r[f"{s}_acc"]))]
        table.add_row(str(r["epoch"]), *cells, f"{r['lr']:.2e}", f"{r['images_per_s']:.0f}", f"{r['seconds']:.1f}",
                      style=style)
    return table


@app.command()
@user_errors
def tune(config: Optional[Path] = ConfigOpt, set_: List[str] = SetOpt,
         resume: bool = typer.Option(False, "--resume", help="Continue the interrupted experiment tune.name."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No live trial table.")) -> None:
    """Search hyperparameters with Ray Tune; writes best.yaml, trials.csv and trials.png."""
    from trainrig.search.tune import run as run_tune

    result = run_tune(_load(config, set_), resume=resume, verbose=not quiet)
    out.print(tune_table(result))
    out.print(f"best: {result.best_params} -> {result.best_metrics}")
    out.print(f"best config: {result.best_config_path}  (trainer fit --config {result.best_config_path})")
    if result.interrupted:
        err.print(f"interrupted: {result.finished} of {result.expected} trials finished; the outputs above are "
                  f"marked partial; continue with: trainer tune --resume (same config)")
        raise typer.Exit(130)


def _trial_id(name: str) -> str:
    """Ray's trial folder ``_trial_3b810f99_3_optim_lr=0.0002,..._2026-11-27_20-52-19`` -> ``3b810f99_3``."""
    found = re.search(r"([0-9a-f]{5,8}_\d{1,5})(?:_|$)", name)
    return found.group(1) if found else name[:12]


def _stop(reason: str) -> str:
    if reason.startswith("stopped early by "):
        return reason.removeprefix("stopped early by ") + " stop"
    return "done" if reason == "completed" else "error" if reason.startswith("error") else reason[:10]


def tune_table(result) -> Table:
    """One line per trial in 80 columns: short trial id, parameters, rounded metrics (full text in trials.csv)."""
    params = list(dict.fromkeys(k for row in result.trials for k in row if k.startswith("param:")))
    metrics = [k for k in result.trials[0] if k.startswith(("final_", "best_", "test_"))] if result.trials else []
    table = Table(title=f"trials of {result.experiment_dir.name} (details: trials.csv)")
    table.add_column("trial", no_wrap=True)
    for name in [*params, *metrics]:
        header = name.removeprefix("param:").rsplit(".", 1)[-1]
        table.add_column(header.split("_")[0] if name in metrics else header, justify="right", no_wrap=True)
    table.add_column("epochs", justify="right")
    table.add_column("end", no_wrap=True)
    for row in result.trials:
        table.add_row(_trial_id(str(row.get("trial", ""))), *(_short(row.get(k, ""), 10) for k in [*params, *metrics]),
                      str(row.get("epochs_run", "")), _stop(str(row.get("stop_reason", ""))))
    return table


@app.command("eval")
@user_errors
def eval_(checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by trainer fit."),
          tta: Optional[str] = TTAOpt, set_: List[str] = SetOpt, trust: bool = TrustOpt,
          out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json, confusion.png, "
                                                 "mistakes.png, report.html; default <run>/eval-<checkpoint name>.")
          ) -> None:
    """Evaluate a saved checkpoint on its config's test set and write the evaluation report."""
    from trainrig.trained.inference import evaluate_checkpoint

    if out_dir is None:
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        out_dir = run_dir / f"eval-{checkpoint.stem}"
    res = evaluate_checkpoint(checkpoint, [*set_, *([f"eval.tta={tta}"] if tta else [])], trust_class_path=trust,
                              out_dir=out_dir)
    views = f", tta {tta}" if tta else ""
    rep = res["report"]
    out.print(f"{checkpoint} (epoch {res['epoch']}{views}): test loss {res['test_loss']:.4f}, "
              f"test accuracy {_pct(res['test_acc'])} on {res['test_samples']} images, macro-F1 "
              f"{rep['macro_f1']:.4f}, ECE {rep['ece']:.4f}; report {out_dir / 'report.html'}")


@app.command("report")
@user_errors
def report_cmd(run_dir: Path = typer.Argument(..., help="A run folder (or a trainer eval --out folder).")) -> None:
    """Rebuild report.html (and curves.png, confusion.png) from a run folder's files."""
    from trainrig.tracking.page import write_page

    out.print(f"wrote {write_page(run_dir, replot=True)}")


@app.command("data")
@user_errors
def data_cmd(config: Optional[Path] = ConfigOpt, set_: List[str] = SetOpt) -> None:
    """Read the configured dataset once (downloading it if missing and online) and describe it."""
    from trainrig import data

    cfg = _load(config, set_)
    splits = data.load_splits(cfg.data, cfg.seed, channels=cfg.model.in_channels,
                              pretrained=cfg.model.weights == "imagenet")
    out.print(escape(splits.description), highlight=False, soft_wrap=True)
    out.print(f"classes: {', '.join(splits.classes[:20])}{' ...' if len(splits.classes) > 20 else ''}",
              highlight=False, soft_wrap=True)


@app.command()
@user_errors
def predict(paths: List[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
            checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by trainer fit."),
            top_k: int = typer.Option(3, "--top-k", min=1, help="Classes shown per image."),
            out_csv: Optional[Path] = typer.Option(None, "--out", help="Also write the predictions to this CSV."),
            tta: Optional[str] = TTAOpt, trust: bool = TrustOpt) -> None:
    """Label images with a trained model; preprocessing comes from the checkpoint."""
    from trainrig.training.checkpoint import check_writable
    from trainrig.trained.inference import predict as run_predict, write_csv

    if out_csv is not None:
        check_writable(out_csv, "--out")
    preds = run_predict(checkpoint, paths, top_k=top_k, tta=tta, trust_class_path=trust)
    table = Table(title=f"{len(preds)} images, {checkpoint}")
    table.add_column("image", overflow="fold")
    for i in range(1, max((len(p.classes) for p in preds), default=0) + 1):
        table.add_column(f"top {i}", justify="left")
    for p in preds:
        table.add_row(escape(p.path), *(f"{escape(c)} {100 * pr:.1f}%" for c, pr in zip(p.classes, p.probabilities)))
    out.print(table)
    if out_csv is not None:
        write_csv(preds, out_csv)
        out.print(f"wrote {out_csv}")


@app.command("export")
@user_errors
def export_cmd(checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by trainer fit."),
               fmt: str = typer.Option("onnx", "--format", help="onnx | torchscript | pt2 (torch.export) | safetensors"),
               out_path: Optional[Path] = typer.Option(None, "--out", help="Output file (default: RUN/export/)."),
               force: bool = typer.Option(False, "--force", help="Replace an existing export."),
               trust: bool = TrustOpt) -> None:
    """Export a trained model; its preprocessing and class names go to a .json beside it."""
    from trainrig.trained.export import export

    res = export(checkpoint, fmt, out_path, force=force, trust_class_path=trust)
    out.print(f"wrote {res.path} and {res.sidecar}; outputs match the checkpoint's to {res.max_abs_diff:.2e} "
              f"(logits up to {res.max_abs_logit:.2f})")


@app.command()
@user_errors
def runs(folder: Path = typer.Argument(Path("runs"), help="Folder of run folders (searched 3 levels down)."),
         sort: str = typer.Option("started", "--sort", help="started | name | best (val acc) | test | time | epochs"),
         last: Optional[int] = typer.Option(None, "--last", min=1, help="Only the N most recently started runs."),
         plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw their validation-accuracy curves here.")
         ) -> None:
    """Compare run folders: epochs, the chosen epoch's val accuracy, its test accuracy, time, speed and the config
    keys that differ."""
    from trainrig.tracking import runs as runs_mod
    from trainrig.training.checkpoint import check_writable

    if plot is not None:
        check_writable(plot, "--plot")
    summaries = runs_mod.compare(folder, sort, last)
    if not summaries:
        out.print(f"no run folders (with config.yaml) under {folder}")
        return
    keys = runs_mod.differing(summaries)
    table = Table(title=f"{len(summaries)} runs in {folder}")
    for col in ("run", "started", "epochs", "val (epoch)", "test", "time", "img/s", *keys):
        table.add_column(col, justify="left" if col in ("run", "started") else "right", overflow="fold",
                         no_wrap=col == "epochs", min_width=11 if col == "epochs" else None)
    for s in summaries:
        best = f"{_pct(s.best_acc)} ({s.best_epoch})" if s.best_acc is not None else "-"
        table.add_row(escape(str(s.path.relative_to(folder)) if s.path != folder else s.name), s.started_text,
                      f"{s.epochs_done}/{s.epochs_planned}" + ("" if s.status == "done" else f" {s.status.split()[0]}"),
                      best, _pct(s.test_acc) if s.test_acc is not None else "-", f"{s.seconds / 60:.1f} min", f"{s.images_per_s:.0f}" if s.images_per_s else "-",
                      *(escape(_short(s.config.get(k))) for k in keys))
    out.print(table)
    for s in summaries:
        if s.problem:
            err.print(f"damaged: {escape(str(s.path))}: {escape(s.problem)}", highlight=False, soft_wrap=True)
    if plot is not None:
        out.print(f"wrote {runs_mod.plot(summaries, plot)}")


@app.command()
def gpus(watch: float = typer.Option(0, "--watch", help="Refresh every N seconds (Ctrl-C stops).", min=0)) -> None:
    """GPU usage table (ID, util %, memory %, per-device total/free, this process's allocated/reserved/peak)."""
    import time

    from trainrig.training import memory

    while True:
        rows = memory.gpu_usage()
        if not rows:
            host = memory.host_memory()
            out.print(f"no CUDA GPU visible (torch.cuda.is_available() is False); host RAM: "
                      f"{host['available']:.0f} MiB available of {host['total']:.0f} MiB, this process "
                      f"{host['process_rss']:.0f} MiB")
        else:
            table = Table(title="GPU usage (MiB)")
            for col in ("ID", "name", "GPU util %", "memory %", "total", "free", "allocated", "reserved", "peak"):
                table.add_column(col, justify="right")
            for r in rows:
                pct = (lambda v: "-" if v is None else f"{v:.0f}%")
                table.add_row(str(r.index), r.name, pct(r.util_percent), pct(r.memory_percent), f"{r.total:.0f}",
                              f"{r.free:.0f}", f"{r.allocated:.0f}", f"{r.reserved:.0f}", f"{r.peak:.0f}")
            out.print(table)
        if not watch:
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


@config_app.command("show")
@user_errors
def config_show(config: Optional[Path] = ConfigOpt, set_: List[str] = SetOpt) -> None:
    """Print the fully resolved config (defaults <- YAML <- --set) as YAML."""
    sys.stdout.write(config_mod.dump(_load(config, set_)))


@config_app.command("keys")
def config_keys(markdown: bool = typer.Option(False, "--markdown", help="Print docs/config.md instead.")) -> None:
    """List every config key with its type, default and meaning."""
    if markdown:
        sys.stdout.write(reference.markdown_reference())
        return
    table = Table(show_lines=False)
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for row in reference.describe():
        table.add_row(*row)
    out.print(table)


# after the commands above, so that --help lists fit and tune first
from trainrig.cli_preflight import lr_find_cmd, profile_cmd, summary_cmd  # noqa: E402 (registered there)


def main() -> None:
    app()


if __name__ == "__main__":
    main()


__all__ = ["app", "main", "fit_table", "tune_table", "lr_find_cmd", "summary_cmd", "profile_cmd"]
