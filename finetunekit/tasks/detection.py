"""Object detection on a torchvision detector (GeneralizedRCNN: Faster R-CNN).

Batches are (list of images [3, H, W] float in [0, 1], list of targets {"boxes" [N, 4] xyxy px, "labels" [N]
1-based, "iscrowd" [N]}). Training: the detector in train mode returns its loss dict; the loss is its sum.
Evaluation: the detections of the eval-mode model, scored by torchmetrics' MeanAveragePrecision, the COCO
definition (101-point interpolated precision; mAP@[.5:.95] over 10 IoU thresholds, mAP@0.5; `iscrowd` boxes
— VOC's difficult ones — match detections without counting as misses or hits). A torchvision detector
returns no loss in eval mode, so the validation loss is the training-mode RPN + RoI loss on the same
backbone features (proposal sampling seeded, training's random stream untouched).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .base import Step

AP_DEFINITION = "COCO: 101-point interpolated AP; map = mean over IoU 0.50:0.05:0.95, map50 at IoU 0.5"


def backend() -> str | None:
    """torchmetrics' COCO evaluator: faster_coco_eval where installed, else pycocotools; None when neither."""
    import importlib.util

    for name, module in (("faster_coco_eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        if importlib.util.find_spec(module) is not None:
            return name
    return None


@contextmanager
def _training(*modules: nn.Module):
    modes = [m.training for m in modules]
    for m in modules:
        m.training = True  # the RPN and RoI heads read self.training only (no dropout or norms inside)
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def detect_with_losses(model: nn.Module, images: list[torch.Tensor], targets: list[dict]):
    """(detections in the input images' pixels, {loss name: value}) of an eval-mode GeneralizedRCNN in one
    backbone pass: the heads run once as in training (their losses), once as at inference (the detections)."""
    model = getattr(model, "module", model)  # a DDP wrapper
    sizes = [tuple(img.shape[-2:]) for img in images]
    batch, scaled = model.transform(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    with _training(model.rpn, model.roi_heads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the heads sample proposals at random: the same sample every evaluation
        proposals, rpn_losses = model.rpn(batch, features, scaled)
        _, roi_losses = model.roi_heads(features, proposals, batch.image_sizes, scaled)
    proposals, _ = model.rpn(batch, features)
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return model.transform.postprocess(detections, batch.image_sizes, sizes), {**rpn_losses, **roi_losses}


class Detection:
    """Faster R-CNN fine-tuning: boxes, labels and scores for `classes` (index 0 of the model is background)."""

    kind = "detection"
    running_metric = "loss_box_reg"  # the box-regression part of the training loss
    headline = ("map50", "map")
    default_monitor = "map50"
    target_dtype = torch.int64
    input_transform = None
    class_weights = None
    decoded_cache = False  # samples are (image, boxes): build.fast_inputs keeps the task's own loaders
    auto_batch = 8  # --batch-size auto's target: detection batches are a few large images

    @classmethod
    def from_options(cls, classes, **_):
        return cls(classes)

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def prepare(self, batch):
        return batch  # the loader (accelerate's) puts lists and dicts of tensors on the device

    def step(self, model: nn.Module, batch) -> Step:
        images, targets = batch
        losses = model(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])
        return Step(sum(losses.values()), len(images), {k: v.detach() for k, v in losses.items()})

    def running(self, outputs: dict, batch) -> torch.Tensor:
        return outputs["loss_box_reg"] * len(batch[0])

    # each image's detections and targets are a different size: evaluation gathers them across processes as
    # pickled per-image records (accelerate's gather_object), not by all_gather of tensors, which needs one shape
    # and hung a 2-process run in its first validation
    gather_objects = True

    def eval_outputs(self, model: nn.Module, batch):
        """Per image: its detections with its share of the batch's loss (the batch mean), and its target."""
        images, targets = batch
        detections, losses = detect_with_losses(model, images, targets)
        loss = sum(losses.values()).detach().double()
        return [{**d, "loss": loss.reshape(1)} for d in detections], targets

    def metrics(self):
        from torchmetrics.detection import MeanAveragePrecision

        name = backend()
        if name is None:
            from ..errors import UserError

            raise UserError("--task detection: needs pycocotools or faster-coco-eval for mean average precision "
                            "(pip install pycocotools)")
        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend=name)

    def update(self, metrics, outputs: dict, targets: list[dict]):
        metrics.update([{k: d[k] for k in ("boxes", "scores", "labels")} for d in outputs],
                       [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"].long()}
                        for t in targets])
        return sum(d["loss"].sum() for d in outputs), len(targets)

    def summarize(self, computed: dict) -> dict:
        out = {"map50": float(computed["map_50"]), "map": float(computed["map"]), "map75": float(computed["map_75"]),
               "mar": float(computed["mar_100"]), "ap_definition": AP_DEFINITION}
        ids = computed["classes"].reshape(-1).tolist()
        aps = computed["map_per_class"].reshape(-1).tolist()
        out["per_class"] = {}
        for i, ap in zip(ids, aps):
            if 1 <= i <= len(self.classes):
                out["per_class"][self.classes[i - 1]] = {"ap": float(ap)}
        return out

    def predict(self, outputs: list[dict], top_k: int = 1) -> list[dict]:
        """One dict per image: boxes [[x1, y1, x2, y2] px], labels, scores (best first)."""
        return [{"boxes": [[round(float(v), 2) for v in b] for b in d["boxes"]],
                 "labels": [self.classes[int(i) - 1] for i in d["labels"]],
                 "scores": [round(float(s), 4) for s in d["scores"]]} for d in outputs]
