"""Knowledge distillation (`--teacher`): the student learns from a fixed teacher's outputs as well as from
the labels (Hinton et al. 2015).

The loss that is back-propagated is

    (1 - alpha) * task loss + alpha * distillation loss

where the task loss is the task's own (label smoothing, class weights, MixUp's soft targets and all: what the
log shows as the train loss, unchanged) and the distillation loss is, with student logits s and teacher
logits t at temperature T:

    classification   KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over the batch, x T^2
    multi-label      the same per label on sigmoids (binary KL), averaged over labels and batch, x T^2
    --kd-hard        cross-entropy on the teacher's top class (multi-label: BCE on its labels at the
                     task's threshold), no temperature

The T^2 keeps the soft loss's gradients at the scale of the task loss's as T changes. The teacher's logits
come from the batch itself (a build stage cached them: the third element of the batch, which `train_batch`
takes off before the task sees it) or from running the teacher on the batch as training sees it, after every
earlier add-on's `train_batch` (MixUp/CutMix: the mixed images). The teacher itself (finetunekit/teacher.py)
runs in eval mode without gradients; it is no part of the model, so the optimizer, the EMA, checkpoints and
the model folder hold the student alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import AddOn

log = logging.getLogger("finetunekit")


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) over the last dimension, averaged over the batch, x T^2."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def soft_loss_multilabel(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary KL(sigmoid(teacher / T) || sigmoid(student / T)) per label, averaged over labels and batch, x T^2."""
    s, t = student.float() / temperature, teacher.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * temperature ** 2


def hard_loss(student: torch.Tensor, teacher: torch.Tensor, multilabel: bool, threshold: float = 0.5) -> torch.Tensor:
    """Cross-entropy on the teacher's top class; multi-label: BCE on the labels the teacher predicts."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(student.float(), (teacher.sigmoid() > threshold).float())
    return F.cross_entropy(student.float(), teacher.argmax(-1))


class Distill(AddOn):
    name = "distill"

    def __init__(self, teacher, alpha: float, temperature: float, hard: bool, multilabel: bool,
                 threshold: float = 0.5):
        self.teacher, self.alpha, self.temperature, self.hard = teacher, alpha, temperature, hard
        self.multilabel, self.threshold = multilabel, threshold
        self._cached: torch.Tensor | None = None  # this batch's teacher logits, when the batch carried them

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.hard:
            return hard_loss(student, teacher, self.multilabel, self.threshold)
        if self.multilabel:
            return soft_loss_multilabel(student, teacher, self.temperature)
        return soft_loss(student, teacher, self.temperature)

    def train_batch(self, batch, epoch: int):
        if len(batch) > 2:  # (x, y, teacher logits): cached by the build stage (teacher.attach)
            self._cached = batch[2]
            return tuple(batch[:2])
        self._cached = None
        return batch

    def train_loss(self, loss: torch.Tensor, batch, outputs) -> torch.Tensor:
        teacher = self._cached if self._cached is not None else self.teacher(batch[0])
        self._cached = None
        return (1 - self.alpha) * loss + self.alpha * self.distillation_loss(outputs, teacher)

    def model_config(self) -> dict[str, Any]:
        return {"distilled_from": {"teacher": self.teacher.spec, "alpha": self.alpha,
                                   **({"hard": True} if self.hard else {"temperature": self.temperature})}}

    def finish(self, best: Callable[[], torch.nn.Module], folder: Path | None,
               score: Callable[[torch.nn.Module], dict]) -> dict[str, Any]:
        """metrics.json's `distill` entry: the settings, and the teacher's own score on the validation set
        (where it can read the student's batches: not text with another tokenizer)."""
        entry: dict[str, Any] = {"teacher": self.teacher.spec, "alpha": self.alpha, "hard": self.hard,
                                 "temperature": None if self.hard else self.temperature,
                                 "teacher_logits": self.teacher.logits_source}
        module = self.teacher.as_module()
        if module is not None:
            val = score(module)
            entry["teacher_val"] = {k: v for k, v in val.items() if isinstance(v, float)}  # no per-class tables
            main = next((k for k in ("accuracy", "micro_f1") if k in val), None)
            if main:
                log.info("distillation: the teacher's validation %s %.4f", main, val[main])
        return {"distill": entry}
