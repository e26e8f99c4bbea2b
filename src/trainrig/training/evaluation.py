"""The evaluation report of a classifier on one split: what users read before they trust it.

Accuracy, top-5 (more than five classes), per-class precision / recall / F1 / support, macro-F1, the
confusion matrix and the expected calibration error, all computed by torchmetrics, whose states are
summed (or concatenated) over DDP ranks when ``compute`` runs: every test image counts exactly once, as
in one process. The highest-loss images ("mistakes") are kept per rank and gathered.
"""
from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from trainrig.training.step import eval_logits


def _metrics(num_classes: int, bins: int, sync: bool) -> Any:
    from torchmetrics import MeanMetric, MetricCollection
    from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError,
                                             MulticlassConfusionMatrix, MulticlassF1Score, MulticlassPrecision,
                                             MulticlassRecall)

    kw = dict(num_classes=num_classes, sync_on_compute=sync)
    found = {"precision": MulticlassPrecision(average="none", **kw),
             "recall": MulticlassRecall(average="none", **kw),
             "f1": MulticlassF1Score(average="none", **kw),
             "macro_f1": MulticlassF1Score(average="macro", **kw),
             "confusion": MulticlassConfusionMatrix(**kw),
             "ece": MulticlassCalibrationError(n_bins=bins, norm="l1", **kw)}
    if num_classes > 5:
        found["top5_accuracy"] = MulticlassAccuracy(top_k=5, average="micro", **kw)
    loss = MeanMetric(sync_on_compute=sync)
    loss.set_dtype(torch.float64)
    return MetricCollection(found, compute_groups=False), loss


@torch.inference_mode()
def evaluate_report(model: nn.Module, batches: Any, classes: Sequence[str], *, precision: str = "32",
                    tta: str = "none", mistakes: int = 16, bins: int = 15, world: int = 1,
                    gather: Callable[[Any], list] = lambda x: [x],
                    on_batch: Callable[[int], None] = lambda i: None) -> dict[str, Any]:
    """The report over every sample of ``batches`` (this rank's share; ``world`` > 1: torchmetrics sums the
    ranks' states and ``gather`` collects their mistakes). ``batches.order()`` names the dataset index of
    each sample, so mistakes can be shown; a plain iterable of (x, y) is indexed 0, 1, 2 ..."""
    was_training = model.training
    model.eval()
    collection = loss_mean = None
    order = batches.order().tolist() if hasattr(batches, "order") else None
    worst: list[tuple[float, int, int, int, float]] = []  # a min-heap of (loss, -index, label, pred, conf)
    seen = 0
    for i, (x, y) in enumerate(batches, 1):
        logits = eval_logits(model, x, precision, tta).double()
        y = y.to(logits.device)
        if collection is None:  # the network's outputs may outnumber the named classes
            classes = [*classes, *map(str, range(len(classes), logits.shape[1]))]
            collection, loss_mean = _metrics(logits.shape[1], bins, world > 1)
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        probs = logits.softmax(1)
        collection.update(probs.float(), y)
        loss_mean.update(losses)
        _keep_worst(worst, mistakes, losses, probs, y, order, seen)
        seen += y.shape[0]
        on_batch(i)
    model.train(was_training)
    out = collection.compute()
    ranked = sorted((m for part in gather(worst) for m in part), key=lambda m: (-m[0], -m[1]))[:mistakes]
    return _as_report(out, float(loss_mean.compute()), classes, ranked, bins)


def _keep_worst(worst: list, n: int, losses: torch.Tensor, probs: torch.Tensor, y: torch.Tensor,
                order: list[int] | None, start: int) -> None:
    """Keep the ``n`` highest-loss samples seen so far (ties: the lower dataset index)."""
    if not n:
        return
    conf, pred = probs.max(1)
    top = torch.topk(losses, min(n, losses.shape[0])).indices.tolist()
    for i in top:
        index = order[start + i] if order is not None else start + i
        item = (float(losses[i]), -index, int(y[i]), int(pred[i]), float(conf[i]))
        if len(worst) < n:
            heapq.heappush(worst, item)
        elif item[:2] > worst[0][:2]:
            heapq.heapreplace(worst, item)


def _as_report(out: dict, loss: float, classes: Sequence[str], ranked: Iterable, bins: int) -> dict[str, Any]:
    confusion = out["confusion"].long()
    support = confusion.sum(1).tolist()
    report: dict[str, Any] = {  # accuracy from torchmetrics' confusion counts in float64: exact (its own is float32)
        "samples": int(confusion.sum()), "loss": loss,
        "accuracy": float(confusion.diag().sum().double() / max(int(confusion.sum()), 1)),
        "top5_accuracy": float(out["top5_accuracy"]) if "top5_accuracy" in out else None,
        "macro_f1": float(out["macro_f1"]), "ece": float(out["ece"]), "calibration_bins": bins,
        "classes": list(classes),
        "per_class": [{"class": name, "precision": float(out["precision"][c]), "recall": float(out["recall"][c]),
                       "f1": float(out["f1"][c]), "support": int(support[c])} for c, name in enumerate(classes)],
        "confusion_matrix": confusion.tolist(),
        "mistakes": [{"index": -neg, "label": label, "predicted": pred, "confidence": conf, "loss": loss_i}
                     for loss_i, neg, label, pred, conf in ranked],
    }
    return report


def write_files(folder: Path, ev: dict[str, Any], test_set: Any, title: str = "") -> None:
    """eval.json, confusion.png, mistakes.png (images read from ``test_set`` by index) and report.html."""
    from trainrig.tracking import page, report
    from trainrig.training.checkpoint import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "eval.json", json.dumps(ev, indent=1) + "\n")
    report.plot_confusion(folder / "confusion.png", ev["confusion_matrix"], ev["classes"],
                          title=f"{title}: test confusion (per true class)" if title else "")
    if ev["mistakes"]:
        images = [test_set[m["index"]][0] for m in ev["mistakes"]]
        report.plot_mistakes(folder / "mistakes.png", images, ev["mistakes"], ev["classes"])
    page.write_page(folder)
