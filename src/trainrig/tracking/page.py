"""report.html: one self-contained page per run (no server, no external URL: pictures are inlined) with
the test figures of the chosen checkpoint, the per-class table, the curves, the confusion matrix, the
mistakes and the config. ``trainer report RUN_DIR`` rebuilds it from the run folder's files."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from trainrig.tracking import report
from trainrig.training.checkpoint import atomic_write_text
from trainrig.errors import ConfigError

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "th{background:#eee}td.name{text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:1em;"
         "overflow:auto;font-size:12px}.figure{font-size:1.4em;margin-right:1.5em}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p>({html.escape(path.name)} not written)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _summary(ev: dict) -> str:
    figures = [("accuracy", "test accuracy", _pct(ev["accuracy"])),
               ("top5_accuracy", "top-5", _pct(ev.get("top5_accuracy"))),
               ("macro_f1", "macro-F1", f"{ev['macro_f1']:.4f}"), ("ece", "calibration error (ECE)", f"{ev['ece']:.4f}"),
               ("loss", "test loss", f"{ev['loss']:.4f}"), ("samples", "test images", str(ev["samples"]))]
    return "".join(f'<span class="figure">{label}: <b id="{key}">{value}</b></span>' for key, label, value in figures)


def _per_class(ev: dict) -> str:
    rows = "".join(
        f'<tr><td class="name">{html.escape(str(c["class"]))}</td><td class="precision">{c["precision"]:.4f}</td>'
        f'<td class="recall">{c["recall"]:.4f}</td><td class="f1">{c["f1"]:.4f}</td>'
        f'<td class="support">{c["support"]}</td></tr>' for c in ev["per_class"])
    return (f'<table id="per-class"><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>'
            f'</tr>{rows}</table>')


def _chosen(ev: dict) -> str:
    what = {k: ev[k] for k in ("checkpoint", "epoch", "monitor", "seed", "tta") if k in ev}
    return html.escape(", ".join(f"{k} {v}" for k, v in what.items()))


def write_page(run_dir: str | Path, replot: bool = False) -> Path:
    """Write ``run_dir/report.html`` from eval.json, curves.png, confusion.png, mistakes.png and config.yaml
    (``replot``: redraw curves.png from metrics.csv and confusion.png from eval.json first)."""
    run_dir = Path(run_dir)
    try:
        ev: dict[str, Any] = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir}: no readable eval.json ({type(exc).__name__}); a run writes it when fit ends "
                          f"with eval.test: true (or trainer eval --checkpoint ... --out {run_dir})") from None
    if replot:
        if (run_dir / "metrics.csv").is_file():
            report.plot_curves(run_dir, report.read_metrics(run_dir / "metrics.csv"), title=run_dir.name)
        report.plot_confusion(run_dir / "confusion.png", ev["confusion_matrix"], ev["classes"])
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else "(no config.yaml)"
    body = (f"<h1>{html.escape(run_dir.name)}</h1><p>Test set, evaluated once on the chosen checkpoint: "
            f"{_chosen(ev)}. No choice of the run read these figures.</p><p>{_summary(ev)}</p>"
            f"<h2>Per class</h2>{_per_class(ev)}<h2>Curves</h2>{_img(run_dir / 'curves.png', 'curves')}"
            f"<h2>Confusion matrix</h2>{_img(run_dir / 'confusion.png', 'confusion matrix')}"
            f"<h2>Highest-loss test images</h2>{_img(run_dir / 'mistakes.png', 'mistakes')}"
            f"<h2>Config</h2><pre>{html.escape(config)}</pre>")
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)} - trainrig '
            f"report</title><style>{STYLE}</style></head><body>{body}</body></html>\n")
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
