"""Progress display for fit: a rich bar over epochs and batches, plain lines, or nothing."""
from __future__ import annotations

import sys
from typing import Literal

ProgressMode = Literal["auto", "bar", "lines", "off"]


def _fmt(row: dict) -> str:
    parts = [f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"]
    parts += [f"{name} loss {row[f'{split}_loss']:.4f} acc {100 * row[f'{split}_acc']:.2f}%"
              for split, name in (("val", "val"), ("test", "test (no choice reads it)")) if f"{split}_loss" in row]
    return " | ".join([*parts, f"{row['images_per_s']:.0f} img/s", f"{row['seconds']:.1f}s"])


class Progress:
    """Plain mode: one line per epoch (logs, CI). Subclasses draw bars."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def start(self, epochs: int, first_epoch: int) -> None: ...

    def start_epoch(self, epoch: int, batches: int) -> None: ...

    def batch(self, done: int, loss: float | None) -> None: ...

    def wants_loss(self, step: int) -> bool:
        """Whether to pay a device sync (``.item()``) for showing the running loss at this step."""
        return False

    def message(self, text: str) -> None:
        if self.enabled or text.startswith("warning:"):  # --quiet silences progress, never a warning
            print(text, file=sys.stderr, flush=True)

    def end_epoch(self, row: dict) -> None:
        self.message(_fmt(row))

    def close(self) -> None: ...


class BarProgress(Progress):
    def __init__(self) -> None:
        super().__init__(True)
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                transient=False)
        self.epochs_task = self.batches_task = None

    def start(self, epochs: int, first_epoch: int) -> None:
        self.bar.start()
        self.epochs_task = self.bar.add_task("epochs", total=epochs, completed=first_epoch, info="")

    def start_epoch(self, epoch: int, batches: int) -> None:
        if self.batches_task is not None:
            self.bar.remove_task(self.batches_task)
        self.batches_task = self.bar.add_task(f"epoch {epoch}", total=batches, info="")

    def wants_loss(self, step: int) -> bool:
        return step % 20 == 0

    def batch(self, done: int, loss: float | None) -> None:
        info = {} if loss is None else {"info": f"loss {loss:.4f}"}
        self.bar.update(self.batches_task, completed=done, **info)

    def message(self, text: str) -> None:
        self.bar.console.print(text)

    def end_epoch(self, row: dict) -> None:
        info = f"val acc {100 * row['val_acc']:.2f}%" if "val_acc" in row else ""
        self.bar.update(self.epochs_task, advance=1, info=info)
        self.message(_fmt(row))

    def close(self) -> None:
        self.bar.stop()


def make_progress(mode: ProgressMode = "auto") -> Progress:
    """auto: a bar on a terminal, one line per epoch otherwise; off: silent (``--quiet``)."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    if mode == "bar":
        return BarProgress()
    return Progress(enabled=mode == "lines")
