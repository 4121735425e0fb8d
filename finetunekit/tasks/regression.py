"""Regression: one number per sample; MSE (or L1, Huber); MAE, RMSE, R² and Spearman."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score, SpearmanCorrCoef

from .base import LogitsTask


class Regression(LogitsTask):
    """Outputs [B, 1], targets [B] floats. Targets are used on their own scale."""

    kind = "regression"  # the head and targets it needs: classification | multilabel | regression
    running_metric = "mae"
    headline = ("mae", "rmse", "r2", "spearman")
    default_monitor = "rmse"
    target_dtype = torch.float32
    num_outputs = 1

    @classmethod
    def from_options(cls, classes, *, loss, label_smoothing=0.0, class_weights=None, focal_gamma=2.0, threshold=0.5):
        return cls(loss)

    def __init__(self, loss: str = "mse"):
        if loss not in ("mse", "l1", "huber"):
            raise ValueError(f"regression loss must be mse, l1 or huber, not {loss!r}")
        self.loss_name = loss
        self.classes: list[str] = []

    def _per_sample(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[self.loss_name]
        return fn(out.float().squeeze(-1), target.float(), reduction="none")

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._per_sample(out, target).mean()

    def eval_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._per_sample(out, target)

    def running_on(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out.float().squeeze(-1) - target).abs().sum()

    def for_metrics(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return out.float().squeeze(-1), target.float()

    def metrics(self) -> MetricCollection:
        with warnings.catch_warnings():  # Spearman keeps every prediction: one float per sample, by design
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
            spearman = SpearmanCorrCoef()
        return MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False),
                                 "r2": R2Score(), "spearman": spearman})

    def summarize(self, computed: dict[str, torch.Tensor]) -> dict:
        return {k: float(v) for k, v in computed.items()}

    def predict(self, out: torch.Tensor, top_k: int = 1) -> list[dict]:
        return [{"value": float(v)} for v in out.float().squeeze(-1)]
