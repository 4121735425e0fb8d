"""Test helper (tests only): a run's `val_predictions.csv` in the contract format (docs/report.md), made for real
from the run's saved model, and metrics.json's `calibration` from a temperature fitted on those logits — what
another branch will write in `fit`. The report's tests read real predictions before that lands."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn.functional as F

import finetunekit


def items_from_split(run_dir: Path, split: str = "val") -> tuple[list[str], list[str]]:
    """The split's items and labels: split.json's held-out files (class folders: the label is the folder), the
    folder of class folders it came from, else the table it came from (a CSV whose first column is the item and second the label, '|' between labels)."""
    record = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))[split]
    if record.get("files"):
        return list(record["files"]), [Path(f).parent.name for f in record["files"]]
    if Path(record["from"]).is_dir():  # a folder of class folders
        files = sorted(str(p) for p in Path(record["from"]).glob("*/*") if p.is_file())
        return files, [Path(f).parent.name for f in files]
    with open(record["from"], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t" if record["from"].endswith(".tsv") else ","))[1:]
    return [r[0] for r in rows], [r[1].replace("|", ";") for r in rows]


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def _logits(model, items: list[str]) -> torch.Tensor:
    texts = getattr(model, "tokenizer", None) is not None
    return model.logits([(t,) for t in items] if texts else items)


def write_predictions(run_dir: Path, split: str = "val", items: list[str] | None = None,
                      labels: list[str] | None = None, calibrate: bool = True) -> Path:
    """Single-label: the validation split fits the temperature (recorded in metrics.json's `calibration`);
    another split uses the recorded one. Run it for val first."""
    run_dir = Path(run_dir)
    if items is None:
        items, labels = items_from_split(run_dir, split)
    model = finetunekit.load(run_dir)
    classes, kind = model.classes, model.task.kind
    out = run_dir / f"{split}_predictions.csv"
    logits = _logits(model, items).float().clone()  # out of inference mode: the temperature fit needs autograd
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if kind == "classification":
            targets = torch.tensor([classes.index(lab) for lab in labels])
            t = fit_temperature(logits, targets) if calibrate and split == "val" else _saved_temperature(run_dir)
            before, after = logits.softmax(-1), (logits / t).softmax(-1)
            pred = before.argmax(-1)
            losses = F.cross_entropy(logits, targets, reduction="none")
            w.writerow(["item", "label", "prediction", "score", "score_uncalibrated", "loss"])
            for i, item in enumerate(items):
                w.writerow([item, labels[i], classes[pred[i]], float(after[i, pred[i]]), float(before[i, pred[i]]),
                            float(losses[i])])
            if calibrate and split == "val":
                _record_calibration(run_dir, t, logits, targets)
        elif kind == "multilabel":
            threshold = model.task.threshold
            probs = logits.sigmoid()
            truth = torch.tensor([[float(c in lab.split(";")) for c in classes] for lab in labels])
            losses = F.binary_cross_entropy_with_logits(logits, truth, reduction="none").mean(-1)
            w.writerow(["item", "label", "prediction", "score", "loss", *[f"p_{c}" for c in classes]])
            for i, item in enumerate(items):
                predicted = [c for c, p in zip(classes, probs[i]) if p > threshold]
                w.writerow([item, labels[i], ";".join(predicted), float(probs[i].max()), float(losses[i]),
                            *[float(p) for p in probs[i]]])
        elif kind == "regression":
            values = logits.squeeze(-1)
            w.writerow(["item", "label", "prediction", "loss"])
            for i, item in enumerate(items):
                w.writerow([item, labels[i], float(values[i]), (float(values[i]) - float(labels[i])) ** 2])
    return out


def _saved_temperature(run_dir: Path) -> float:
    """The validation split's temperature (metrics.json), which the test split's scores use; 1 without one."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return float((metrics.get("calibration") or {}).get("temperature", 1.0))


def _record_calibration(run_dir: Path, t: float, logits: torch.Tensor, targets: torch.Tensor) -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    n = logits.shape[-1]
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["calibration"] = {
        "temperature": t,
        "ece_before": float(multiclass_calibration_error(logits.softmax(-1), targets, n, n_bins=15)),
        "ece_after": float(multiclass_calibration_error((logits / t).softmax(-1), targets, n, n_bins=15)),
        "nll_before": float(F.cross_entropy(logits, targets)),
        "nll_after": float(F.cross_entropy(logits / t, targets))}
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def voc_boxes(annotation: Path) -> list[list[float]]:
    root = ET.parse(annotation).getroot()
    return [[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            for o in root.iter("object")]


def write_detection_predictions(run_dir: Path, voc: Path, split: str = "val", min_score: float = 0.05,
                                most: int = 5) -> Path:
    """Detection rows: each image's true boxes (its VOC file), the model's boxes (score >= min_score, at most
    `most`), and the matches at IoU 0.5 (greedy, best score first)."""
    from torchvision.ops import box_iou

    model = finetunekit.load(run_dir)
    images = sorted((voc / "images").glob("*.jpg"))
    found = model.detections([str(p) for p in images])
    out = Path(run_dir) / f"{split}_predictions.csv"
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item", "true_boxes", "predicted_boxes", "true_positives", "false_positives", "missed"])
        for path, d in zip(images, found):
            true = voc_boxes(voc / "annotations" / (path.stem + ".xml"))
            keep = [i for i in range(len(d["scores"])) if d["scores"][i] >= min_score][:most]
            pred = [{"box": [round(float(v), 1) for v in d["boxes"][i]], "label": model.classes[int(d["labels"][i]) - 1],
                     "score": round(float(d["scores"][i]), 3)} for i in keep]
            matched = set()
            if pred and true:
                iou = box_iou(torch.tensor([p["box"] for p in pred]), torch.tensor(true))
                for i in range(len(pred)):
                    j = next((j for j in iou[i].argsort(descending=True).tolist()
                              if iou[i, j] >= 0.5 and j not in matched), None)
                    if j is not None:
                        matched.add(j)
            tp = len(matched)
            w.writerow([str(path), json.dumps(true), json.dumps(pred), tp, len(pred) - tp, len(true) - tp])
    return out
