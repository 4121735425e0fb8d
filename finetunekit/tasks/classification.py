"""Single-label classification: cross-entropy, torchmetrics metrics, top-k predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)


class Classification:
    """N classes, one per sample. Logits [B, N], targets [B] (class indices)."""

    def __init__(self, classes: list[str], label_smoothing: float = 0.0):
        self.classes = list(classes)
        self.label_smoothing = label_smoothing

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

    def eval_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss without smoothing: comparable across recipes."""
        return F.cross_entropy(logits.float(), target, reduction="none")

    def metrics(self) -> MetricCollection:
        n = self.num_outputs
        m = {"accuracy": MulticlassAccuracy(n, average="micro"),
             "macro_f1": MulticlassF1Score(n, average="macro"),
             "precision": MulticlassPrecision(n, average=None),
             "recall": MulticlassRecall(n, average=None),
             "confusion_matrix": MulticlassConfusionMatrix(n)}
        if n > 5:
            m["top5_accuracy"] = MulticlassAccuracy(n, top_k=5, average="micro")
        return MetricCollection(m)

    def summarize(self, computed: dict[str, torch.Tensor]) -> dict:
        """torchmetrics output -> a JSON-ready dict with per-class figures named by class."""
        out = {k: float(v) for k, v in computed.items() if v.ndim == 0}
        out["per_class"] = {c: {"precision": float(p), "recall": float(r)}
                            for c, p, r in zip(self.classes, computed["precision"], computed["recall"])}
        out["confusion_matrix"] = computed["confusion_matrix"].int().tolist()
        return out

    def predict(self, logits: torch.Tensor, top_k: int = 1) -> list[dict]:
        probs = logits.float().softmax(-1)
        k = min(top_k, self.num_outputs)
        scores, idx = probs.topk(k, dim=-1)
        return [{"label": self.classes[int(i[0])], "score": float(s[0]),
                 "top_k": [{"label": self.classes[int(j)], "score": float(t)} for j, t in zip(i, s)]}
                for i, s in zip(idx, scores)]
