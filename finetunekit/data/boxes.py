"""Detection samples: (float image [3, H, W] in [0, 1], target dict) with torchvision transforms v2, whose
tv_tensors.BoundingBoxes move with the pixels (flips, scale jitter, crops)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .images import load_rgb
from .order import sample_rng, split_key


def _labels_and_crowd(inputs):
    """What SanitizeBoundingBoxes filters along with the boxes (module level: loader workers pickle it)."""
    target = inputs[1]
    return target["labels"], target["iscrowd"]


def detection_transform(augment: str, min_size: int, max_size: int) -> v2.Compose:
    """none: resize only; light: + horizontal flip and scale jitter (0.8-1.2 of --min-size); standard: +
    photometric distortion; strong: + random IoU crop. Images are resized to about the detector's own size
    here (its GeneralizedRCNNTransform resizes again, exactly), so workers decode and shrink in parallel."""
    steps: list = []
    if augment == "strong":
        steps += [v2.RandomIoUCrop(), v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd)]
    if augment in ("standard", "strong"):
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    if augment == "none":
        steps.append(v2.Resize(min_size, max_size=max_size, antialias=True))
    else:
        sizes = sorted({int(min_size * s) for s in (0.8, 0.9, 1.0, 1.1, 1.2)})
        steps += [v2.RandomShortestSize(sizes, max_size=max_size, antialias=True), v2.RandomHorizontalFlip(0.5)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd)]
    return v2.Compose(steps)


def make_target(boxes, labels, difficult, size: tuple[int, int]) -> dict:
    """`labels` are 0-based class indices; the detector's are 1-based (0 is the background)."""
    return {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=size),
            "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1) + 1,
            "iscrowd": torch.tensor(difficult, dtype=torch.bool).reshape(-1)}


class DetectionDataset(Dataset):
    """(image [3, H, W] float in [0, 1], {"boxes" [N, 4] xyxy px, "labels" [N] 1-based, "iscrowd" [N]})."""

    def __init__(self, split, transform):
        self.split, self.transform = split, transform
        self.paths = split.paths

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        i, seed = split_key(key)  # training keys carry a per-sample seed for the augmentation (data.order)
        image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb(self.paths[i])))
        target = make_target(self.split.boxes[i], self.split.labels[i], self.split.difficult[i],
                             tuple(image.shape[-2:]))
        with sample_rng(seed):
            image, target = self.transform(image, target)
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}


def collate(samples):
    """A batch: (list of images, list of target dicts): images differ in size."""
    images, targets = zip(*samples)
    return list(images), list(targets)
