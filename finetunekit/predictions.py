"""The best model's predictions as files: RUN/val_predictions.csv and RUN/test_predictions.csv.

The contract (the run report reads exactly this; docs/calibration.md): a UTF-8 CSV with a header, one row per
sample in dataset order (the order of split.json / the input table), with the columns

    classification   item,label,prediction,score,score_uncalibrated,loss
    multi-label      item,label,prediction,score,score_uncalibrated,loss,p_CLASS...
    regression       item,label,prediction,loss
    detection        item,true_boxes,predicted_boxes,true_positives,false_positives,missed
    seq2seq          item,reference,prediction,loss

item: the image path as read (text: the text; a sentence pair joined with " [SEP] "; shard data: the sample's
index). label, prediction: class names (multi-label: joined with ";", the prediction being the classes whose
calibrated probability is above the task's threshold). score: the calibrated probability of the predicted class
(multi-label: the mean over the predicted classes, or the largest probability when none is predicted);
score_uncalibrated: the same without the temperature; loss: the per-sample plain loss on the uncalibrated
logits (cross-entropy without smoothing or weights; multi-label: the mean BCE over classes; regression: the
squared error). p_CLASS: each class's calibrated probability. Detection: box counts per image, the
predicted ones at score >= 0.5, matched one-to-one to true boxes of the same class at IoU >= 0.5 (highest
score first).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .calibration import scale

DETECTION_IOU = 0.5
DETECTION_SCORE = 0.5
FILES = {"val": "val_predictions.csv", "test": "test_predictions.csv"}


def items_of(loader) -> list[str] | None:
    """What the item column says for each sample of an (unprepared) evaluation loader, in dataset order."""
    dataset = getattr(loader, "dataset", None)
    if getattr(dataset, "paths", None) is not None:
        return [str(p) for p in dataset.paths]
    if getattr(dataset, "texts", None) is not None:
        return [" [SEP] ".join(t) if isinstance(t, (tuple, list)) else str(t) for t in dataset.texts]
    return None


def loader_order(loader, n: int) -> list[int]:
    """The dataset index of each sample in the order the loader yields them (text evaluation loaders sort by
    length: data.text.SortedBatches)."""
    order = getattr(getattr(loader, "batch_sampler", None), "order", None)
    return list(order) if order is not None and len(order) == n else list(range(n))


def in_dataset_order(outputs: Any, order: Sequence[int]) -> Any:
    """Loader-ordered outputs (a tensor, or a list for detection) put back in dataset order."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    if isinstance(outputs, torch.Tensor):
        return outputs[torch.tensor(inverse, dtype=torch.long)] if len(inverse) else outputs
    return [outputs[i] for i in inverse]


def write(path: Path, task, items: Sequence[str] | None, outputs: Any, targets: Any,
          temperature: float | list[float] | None) -> int:
    """Write one split's predictions file (outputs and targets in dataset order); returns its row count."""
    n = len(targets)
    items = list(items) if items is not None and len(items) == n else [str(i) for i in range(n)]
    header, rows = ROWS[task.kind](task, outputs, targets, temperature)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item", *header])
        writer.writerows([item, *row] for item, row in zip(items, rows))
    tmp.replace(path)
    return n


def _g(x: float) -> str:
    return f"{x:.6g}"


def _classification(task, logits: torch.Tensor, targets: torch.Tensor, temperature):
    z = logits.float().cpu()
    raw, cal = z.softmax(-1), scale(z, temperature).softmax(-1)
    score, pred = cal.max(-1)
    loss = F.cross_entropy(z, targets.long().cpu(), reduction="none")
    names = task.classes
    rows = [[names[int(t)], names[int(k)], _g(s), _g(raw[i, k]), _g(l)]
            for i, (t, k, s, l) in enumerate(zip(targets.tolist(), pred.tolist(), score.tolist(), loss.tolist()))]
    return ["label", "prediction", "score", "score_uncalibrated", "loss"], rows


def _multilabel(task, logits: torch.Tensor, targets: torch.Tensor, temperature):
    z, y = logits.float().cpu(), targets.float().cpu()
    raw, cal = z.sigmoid(), scale(z, temperature).sigmoid()
    chosen = cal > task.threshold
    loss = F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(-1)
    names = task.classes

    def score(p: torch.Tensor, on: torch.Tensor) -> float:
        return float(p[on].mean()) if bool(on.any()) else float(p.max())

    rows = [[";".join(c for c, v in zip(names, y[i]) if v > 0.5), ";".join(c for c, v in zip(names, chosen[i]) if v),
             _g(score(cal[i], chosen[i])), _g(score(raw[i], chosen[i])), _g(float(loss[i])),
             *(_g(float(p)) for p in cal[i])] for i in range(len(z))]
    return ["label", "prediction", "score", "score_uncalibrated", "loss", *(f"p_{c}" for c in names)], rows


def _regression(task, out: torch.Tensor, targets: torch.Tensor, temperature):
    pred, y = out.float().cpu().reshape(len(out), -1)[:, 0], targets.float().cpu()
    return ["label", "prediction", "loss"], [[_g(t), _g(p), _g((p - t) ** 2)] for t, p in zip(y.tolist(), pred.tolist())]


def _detection(task, outputs: list[dict], targets: list[dict], temperature):
    from torchvision.ops import box_iou

    rows = []
    for out, true in zip(outputs, targets):
        keep = out["scores"].cpu() >= DETECTION_SCORE
        boxes, labels = out["boxes"].cpu()[keep], out["labels"].cpu()[keep]
        order = out["scores"].cpu()[keep].argsort(descending=True)
        t_boxes, t_labels = true["boxes"].cpu(), true["labels"].cpu()
        iou = box_iou(boxes, t_boxes) if len(boxes) and len(t_boxes) else torch.zeros(len(boxes), len(t_boxes))
        matched: set[int] = set()
        tp = 0
        for i in order.tolist():
            candidates = [(float(iou[i, j]), j) for j in range(len(t_boxes))
                          if j not in matched and int(t_labels[j]) == int(labels[i]) and iou[i, j] >= DETECTION_IOU]
            if candidates:
                matched.add(max(candidates)[1])
                tp += 1
        rows.append([len(t_boxes), len(boxes), tp, len(boxes) - tp, len(t_boxes) - tp])
    return ["true_boxes", "predicted_boxes", "true_positives", "false_positives", "missed"], rows


def _seq2seq(task, outputs: list[dict], targets: list, temperature):
    """The source text (item), the reference and the generated text as the tokenizer decodes them, and the
    sample's mean plain token loss."""
    refs = task.decode(targets)
    made = [o["ids"] for o in outputs]
    hyps = task.decode([m for m in made if m is not None])
    it = iter(hyps)
    rows = [[r, next(it) if m is not None else "", _g(float(o["loss"].sum()))] for r, m, o in zip(refs, made, outputs)]
    return ["reference", "prediction", "loss"], rows


ROWS = {"classification": _classification, "multilabel": _multilabel, "regression": _regression,
        "detection": _detection, "seq2seq": _seq2seq}
