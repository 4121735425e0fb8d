"""`--anchors auto`: anchor sizes and aspect ratios fitted to the training boxes.

The boxes are taken at the detector's own scale (torchvision's resize: the shorter side to min_size, the
longer at most max_size). One size per feature level: 1-D k-means over log sqrt(area) with as many clusters
as levels (initialised at evenly spaced quantiles: deterministic); aspect ratios (height / width): 1-D k-means
over log(h / w), 3 clusters. Fitness, printed for the fitted anchors and the model's own: the fraction of
training boxes whose best anchor (centred on the box) overlaps it with IoU >= 0.7 (the RPN's positive
threshold), and the mean best IoU. When the model's own anchors fit at least as well, they are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RPN_POSITIVE_IOU = 0.7


@dataclass(frozen=True)
class AnchorFit:
    sizes: tuple[int, ...]
    ratios: tuple[float, ...]
    recall: float  # boxes with a best anchor at IoU >= 0.7
    mean_iou: float
    boxes: int


def scaled_wh(boxes: list[list[list[float]]], sizes: list[tuple[int, int]], min_size: int,
              max_size: int) -> np.ndarray:
    """[N, 2] widths and heights of every box at the detector's input scale."""
    out = []
    for image_boxes, (w, h) in zip(boxes, sizes):
        scale = min(min_size / min(w, h), max_size / max(w, h))
        out += [((b[2] - b[0]) * scale, (b[3] - b[1]) * scale) for b in image_boxes]
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Sorted centres of a deterministic 1-D k-means (Lloyd's, quantile initialisation); empty clusters keep
    their centre."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - centres[None, :]).argmin(1)
        new = np.array([values[nearest == j].mean() if (nearest == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def fitness(wh: np.ndarray, sizes, ratios) -> tuple[float, float]:
    """(fraction of boxes with best centred-anchor IoU >= 0.7, mean best IoU). torchvision's anchors: width
    size / sqrt(ratio), height size * sqrt(ratio)."""
    anchors = np.array([(s / math.sqrt(r), s * math.sqrt(r)) for s in sizes for r in ratios])
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    union = wh[:, None, 0] * wh[:, None, 1] + anchors[None, :, 0] * anchors[None, :, 1] - inter
    best = (inter / union).max(1)
    return float((best >= RPN_POSITIVE_IOU).mean()), float(best.mean())


def fit(wh: np.ndarray, levels: int, n_ratios: int = 3) -> AnchorFit:
    """Sizes (one per level, distinct integers, ascending) and ratios fitted to `wh`."""
    wh = wh[(wh > 0).all(1)]
    if len(wh) < levels:
        raise ValueError(f"{len(wh)} training boxes; --anchors auto needs at least {levels}")
    side = np.log(np.sqrt(wh[:, 0] * wh[:, 1]))
    sizes: list[int] = []
    for s in np.exp(kmeans_1d(side, levels)):
        sizes.append(max(int(round(s)), sizes[-1] + 1 if sizes else 1))
    ratios = tuple(round(float(r), 2) for r in np.exp(kmeans_1d(np.log(wh[:, 1] / wh[:, 0]), n_ratios)))
    ratios = tuple(sorted(set(ratios)))
    recall, mean_iou = fitness(wh, sizes, ratios)
    return AnchorFit(tuple(sizes), ratios, recall, mean_iou, len(wh))


def choose(boxes, sizes, min_size: int, max_size: int, default_sizes: tuple[int, ...],
           default_ratios: tuple[float, ...]) -> tuple[AnchorFit | None, str, dict]:
    """(the fit when it beats the model's own anchors else None, a log line, a record for split.json)."""
    wh = scaled_wh(boxes, sizes, min_size, max_size)
    fitted = fit(wh, len(default_sizes), len(default_ratios))
    own_recall, own_iou = fitness(wh[(wh > 0).all(1)], default_sizes, default_ratios)
    better = (fitted.recall, fitted.mean_iou) > (own_recall, own_iou)
    line = (f"anchors auto: k-means over {fitted.boxes} training boxes at the detector's scale (shorter side "
            f"{min_size}px): sizes {','.join(map(str, fitted.sizes))}, aspect ratios "
            f"{','.join(f'{r:g}' for r in fitted.ratios)}: {fitted.recall:.1%} of boxes have an anchor at IoU >= "
            f"{RPN_POSITIVE_IOU:g} (mean best IoU {fitted.mean_iou:.3f}); the model's own "
            f"{','.join(map(str, default_sizes))} x {','.join(f'{r:g}' for r in default_ratios)}: {own_recall:.1%} "
            f"({own_iou:.3f}) -> {'fitted ones used' if better else 'the model' + chr(39) + 's own kept'}")
    record = {"fitted": {"sizes": list(fitted.sizes), "aspect_ratios": list(fitted.ratios),
                         "recall_at_0.7": round(fitted.recall, 4), "mean_best_iou": round(fitted.mean_iou, 4)},
              "model": {"sizes": list(default_sizes), "aspect_ratios": list(default_ratios),
                        "recall_at_0.7": round(own_recall, 4), "mean_best_iou": round(own_iou, 4)},
              "used": "fitted" if better else "model", "boxes": fitted.boxes}
    return (fitted if better else None), line, record
