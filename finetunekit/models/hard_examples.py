"""Online hard-example mining of the RoI loss (`--hard-examples K`): of the RoIs the box head samples per
image (torchvision's 512, a quarter of them positive at most), only the K with the highest loss
(classification + box regression) train. Shrivastava et al., "Training Region-based Object Detectors with
Online Hard Example Mining" (2016), on torchvision's sampler: the candidates are the sampled RoIs, not
every proposal. The RPN's loss is unchanged; so is inference.

The RoI heads become a `HardExampleRoIHeads` (a torchvision `RoIHeads` whose training loss is the mined
one); its state dict is the same, so a model folder loads in plain torchvision either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads


def mined_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: list[torch.Tensor],
               regression_targets: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's fastrcnn_loss over the top-k RoIs of each image by their own loss (ties: the first)."""
    counts = [len(x) for x in labels]
    labels_all = torch.cat(labels)
    targets = torch.cat(regression_targets)
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    ce = F.cross_entropy(class_logits, labels_all, reduction="none")
    box = torch.zeros_like(ce)
    pos = torch.where(labels_all > 0)[0]
    box[pos] = F.smooth_l1_loss(box_regression[pos, labels_all[pos]], targets[pos], beta=1 / 9,
                                reduction="none").sum(1)
    with torch.no_grad():
        per_roi = (ce + box).detach()
        keep, start = [], 0
        for c in counts:
            top = torch.topk(per_roi[start:start + c], min(k, c), sorted=False).indices if c else per_roi.new_zeros(
                0, dtype=torch.long)
            keep.append(top + start)
            start += c
        keep = torch.cat(keep)
    return ce[keep].mean(), box[keep].sum() / max(keep.numel(), 1)


class HardExampleRoIHeads(RoIHeads):
    """RoIHeads whose training loss keeps the `hard_examples` highest-loss sampled RoIs of each image."""

    hard_examples: int = 128

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.has_mask() or self.has_keypoint():
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = mined_loss(class_logits, box_regression, labels, regression_targets,
                                                   self.hard_examples)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def enable(roi_heads: RoIHeads, k: int) -> None:
    """Mine the top `k` RoIs per image (k >= the sampled count: every sampled RoI, torchvision's loss)."""
    roi_heads.__class__ = HardExampleRoIHeads
    roi_heads.hard_examples = k
