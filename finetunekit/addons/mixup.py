"""MixUp / CutMix (timm's Mixup): each training batch mixed with its reverse, targets made soft [B, N]
(label smoothing folded in), until an optional switch-off epoch. Image classification only."""

from __future__ import annotations

import logging

from .base import AddOn

log = logging.getLogger("finetunekit")


class MixUp(AddOn):
    name = "mixup"

    def __init__(self, mixup: float | None, cutmix: float | None, label_smoothing: float, num_classes: int,
                 off_epoch: int | None = None):
        from timm.data import Mixup

        self.mix = Mixup(mixup_alpha=mixup or 0.0, cutmix_alpha=cutmix or 0.0, label_smoothing=label_smoothing,
                         num_classes=num_classes)
        self.off_epoch = off_epoch  # 1-based: batches of this epoch and later are not mixed
        log.info("MixUp %g, CutMix %g%s", mixup or 0, cutmix or 0,
                 f", off from epoch {off_epoch}" if off_epoch else "")

    def train_batch(self, batch, epoch: int):
        if self.off_epoch is not None and epoch + 1 >= self.off_epoch:
            return batch
        x, y = batch
        return self.mix(x, y)  # (mixed images, soft targets [B, N])
