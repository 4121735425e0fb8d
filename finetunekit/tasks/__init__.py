"""Tasks: each owns its batches, loss, metrics and prediction format, so the loop stays the same for all.

The contract is in tasks/base.py. TASKS is the registry: a task name of the recipe -> its Task class.
What each task reads and which losses and metrics fit it is config.TASKS (torch-free, for the CLI's checks);
tests/test_registries.py checks that the two name the same tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import TASKS as TASK_OPTIONS
from .base import LogitsTask, Step, logits_of
from .classification import Classification
from .detection import Detection
from .multilabel import MultiLabel
from .regression import Regression
from .seq2seq import Seq2Seq

__all__ = ["Classification", "Detection", "LogitsTask", "MultiLabel", "Regression", "Seq2Seq", "Step", "TASKS", "build_task", "logits_of",
           "LOWER_IS_BETTER"]

TASKS: dict[str, type] = {
    "image-classification": Classification,
    "image-multilabel": MultiLabel,
    "image-regression": Regression,
    "text-classification": Classification,
    "text-multilabel": MultiLabel,
    "text-regression": Regression,
    "detection": Detection,
    "seq2seq": Seq2Seq,
}
LOWER_IS_BETTER = {"loss", "mae", "rmse"}


def build_task(task: str, classes: Sequence[str], *, loss: str = "auto", label_smoothing: float = 0.0,
               class_weights: Sequence[float] | None = None, focal_gamma: float = 2.0, threshold: float = 0.5):
    loss = TASK_OPTIONS[task][1][0] if loss == "auto" else loss  # the first is the default
    return TASKS[task].from_options(classes, loss=loss, label_smoothing=label_smoothing, class_weights=class_weights,
                                    focal_gamma=focal_gamma, threshold=threshold)
