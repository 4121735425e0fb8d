"""Tasks: each owns its head size, loss, metrics and prediction format, so the loop stays the same.

Every task answers: num_outputs, loss(logits, y) (training), eval_loss(logits, y) (per sample, plain),
running(logits, y) (a cheap training figure, summed over the batch), for_metrics(logits, y), metrics(),
summarize(computed), predict(logits, top_k); and names its headline metrics and default monitor.
"""

from __future__ import annotations

from collections.abc import Sequence

from .classification import Classification
from .multilabel import MultiLabel
from .regression import Regression

__all__ = ["Classification", "MultiLabel", "Regression", "build_task", "LOSSES", "LOWER_IS_BETTER"]

# the losses each kind of task accepts; the first is the default
LOSSES = {"classification": ("ce", "focal"), "multilabel": ("bce", "focal"), "regression": ("mse", "l1", "huber")}
LOWER_IS_BETTER = {"loss", "mae", "rmse"}


def kind_of(task: str) -> str:
    return "multilabel" if task.endswith("multilabel") else "regression" if task.endswith("regression") \
        else "classification"


def build_task(task: str, classes: Sequence[str], *, loss: str = "auto", label_smoothing: float = 0.0,
               class_weights: Sequence[float] | None = None, focal_gamma: float = 2.0, threshold: float = 0.5):
    kind = kind_of(task)
    loss = LOSSES[kind][0] if loss == "auto" else loss
    if kind == "regression":
        return Regression(loss)
    if kind == "multilabel":
        return MultiLabel(classes, threshold, loss, class_weights, focal_gamma)
    return Classification(classes, label_smoothing, loss, class_weights, focal_gamma)
