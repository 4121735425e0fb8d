"""Single-label classification: cross-entropy (or focal), optional class weights, top-k predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from .base import LogitsTask


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, weight: torch.Tensor | None = None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, per sample."""
    ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction="none")
    p_true = logits.softmax(-1).gather(-1, target[:, None]).squeeze(-1)  # [B]
    return (1 - p_true).clamp_min(0).pow(gamma) * ce


class Classification(LogitsTask):
    """N classes, one per sample. Logits [B, N], targets [B] (class indices)."""

    kind = "classification"  # the head and targets it needs: classification | multilabel | regression
    running_metric = "accuracy"  # the cheap training-set figure shown per epoch
    headline = ("accuracy", "macro_f1")
    default_monitor = "accuracy"
    target_dtype = torch.long

    @classmethod
    def from_options(cls, classes, *, loss, label_smoothing=0.0, class_weights=None, focal_gamma=2.0, threshold=0.5):
        return cls(classes, label_smoothing, loss, class_weights, focal_gamma)

    def __init__(self, classes: Sequence[str], label_smoothing: float = 0.0, loss: str = "ce",
                 class_weights: Sequence[float] | None = None, focal_gamma: float = 2.0):
        if loss not in ("ce", "focal"):
            raise ValueError(f"classification loss must be ce or focal, not {loss!r}")
        self.classes = list(classes)
        self.label_smoothing = label_smoothing
        self.loss_name, self.focal_gamma = loss, focal_gamma
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def _weight(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.class_weights is not None and self.class_weights.device != logits.device:
            self.class_weights = self.class_weights.to(logits.device)
        return self.class_weights

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target: class indices [B], or soft targets [B, N] (MixUp/CutMix, already smoothed)."""
        logits, weight = logits.float(), self._weight(logits)
        if target.is_floating_point():
            return F.cross_entropy(logits, target, weight=weight)
        if self.loss_name == "focal":
            per_sample = focal_loss(logits, target, self.focal_gamma, weight, self.label_smoothing)
            # weighted mean, as F.cross_entropy(weight=...) normalises
            return per_sample.sum() / (weight[target].sum() if weight is not None else len(target))
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.label_smoothing)

    def eval_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample plain cross-entropy (no smoothing, no weights): comparable across recipes."""
        return F.cross_entropy(logits.float(), target, reduction="none")

    def running_on(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == target).sum()

    def for_metrics(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.float(), target

    def metrics(self) -> MetricCollection:
        n = self.num_outputs
        m = {"accuracy": MulticlassAccuracy(n, average="micro"),
             "macro_f1": MulticlassF1Score(n, average="macro"),
             "precision": MulticlassPrecision(n, average=None),
             "recall": MulticlassRecall(n, average=None),
             "f1": MulticlassF1Score(n, average=None),
             "confusion_matrix": MulticlassConfusionMatrix(n)}
        if n > 5:
            m["top5_accuracy"] = MulticlassAccuracy(n, top_k=5, average="micro")
        return MetricCollection(m)

    def summarize(self, computed: dict[str, torch.Tensor]) -> dict:
        """torchmetrics output -> a JSON-ready dict with per-class figures named by class."""
        out = {k: float(v) for k, v in computed.items() if v.ndim == 0}
        out["per_class"] = {c: {"precision": float(p), "recall": float(r), "f1": float(f)}
                            for c, p, r, f in zip(self.classes, computed["precision"], computed["recall"],
                                                  computed["f1"])}
        # rows: the true class, columns: the predicted one, both in the order of confusion_matrix_classes
        out["confusion_matrix"] = computed["confusion_matrix"].int().tolist()
        out["confusion_matrix_classes"] = list(self.classes)
        return out

    def predict(self, logits: torch.Tensor, top_k: int = 1) -> list[dict]:
        probs = logits.float().softmax(-1)
        k = min(top_k, self.num_outputs)
        scores, idx = probs.topk(k, dim=-1)
        return [{"label": self.classes[int(i[0])], "score": float(s[0]),
                 "top_k": [{"label": self.classes[int(j)], "score": float(t)} for j, t in zip(i, s)]}
                for i, s in zip(idx, scores)]
