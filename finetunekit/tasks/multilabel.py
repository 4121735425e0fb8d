"""Multi-label classification: any number of labels per sample; BCE-with-logits (or focal), a threshold."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (MultilabelAccuracy, MultilabelAveragePrecision, MultilabelExactMatch,
                                         MultilabelF1Score, MultilabelPrecision, MultilabelRecall)
from torchvision.ops import sigmoid_focal_loss

from .base import LogitsTask


class MultiLabel(LogitsTask):
    """C labels, each on or off. Logits [B, C], targets [B, C] multi-hot floats."""

    kind = "multilabel"  # the head and targets it needs: classification | multilabel | regression
    running_metric = "label_accuracy"  # fraction of (sample, label) decisions right at the threshold
    headline = ("micro_f1", "macro_f1", "map")
    default_monitor = "micro_f1"
    target_dtype = torch.float32

    @classmethod
    def from_options(cls, classes, *, loss, label_smoothing=0.0, class_weights=None, focal_gamma=2.0, threshold=0.5):
        return cls(classes, threshold, loss, class_weights, focal_gamma)

    def __init__(self, classes: Sequence[str], threshold: float = 0.5, loss: str = "bce",
                 class_weights: Sequence[float] | None = None, focal_gamma: float = 2.0):
        if loss not in ("bce", "focal"):
            raise ValueError(f"multi-label loss must be bce or focal, not {loss!r}")
        self.classes = list(classes)
        self.threshold = threshold
        self.loss_name, self.focal_gamma = loss, focal_gamma
        # per-label weight of the positive term (BCE pos_weight): rare labels count more
        self.pos_weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None

    @property
    def class_weights(self) -> torch.Tensor | None:
        return self.pos_weight

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.loss_name == "focal":
            return sigmoid_focal_loss(logits, target, gamma=self.focal_gamma, reduction="mean")
        if self.pos_weight is not None and self.pos_weight.device != logits.device:
            self.pos_weight = self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)

    def eval_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(-1)

    def running_on(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((logits.sigmoid() > self.threshold) == (target > 0.5)).float().mean(-1).sum()

    def for_metrics(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.float().sigmoid(), target.long()

    def metrics(self) -> MetricCollection:
        n, t = self.num_outputs, self.threshold
        return MetricCollection({
            "micro_f1": MultilabelF1Score(n, threshold=t, average="micro"),
            "macro_f1": MultilabelF1Score(n, threshold=t, average="macro"),
            "map": MultilabelAveragePrecision(n, average="macro"),
            "label_accuracy": MultilabelAccuracy(n, threshold=t, average="micro"),
            "exact_match": MultilabelExactMatch(n, threshold=t),  # every label of the sample right
            "precision": MultilabelPrecision(n, threshold=t, average=None),
            "recall": MultilabelRecall(n, threshold=t, average=None),
            "f1": MultilabelF1Score(n, threshold=t, average=None),
        })

    def summarize(self, computed: dict[str, torch.Tensor]) -> dict:
        out = {k: float(v) for k, v in computed.items() if v.ndim == 0}
        out["threshold"] = self.threshold
        out["per_label"] = {c: {"precision": float(p), "recall": float(r), "f1": float(f)}
                            for c, p, r, f in zip(self.classes, computed["precision"], computed["recall"],
                                                  computed["f1"])}
        return out

    def predict(self, logits: torch.Tensor, top_k: int = 1) -> list[dict]:
        probs = logits.float().sigmoid()
        return [{"labels": [c for c, p in zip(self.classes, row) if p > self.threshold],
                 "scores": {c: float(p) for c, p in zip(self.classes, row)}} for row in probs]
