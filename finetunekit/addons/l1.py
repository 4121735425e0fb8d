"""L1 penalty: lambda * sum |w| over the head's weight matrices, added to the loss that is back-propagated
(the logged training loss stays the task's own)."""

from __future__ import annotations

import logging

import torch

from .base import AddOn

log = logging.getLogger("finetunekit")


class L1Penalty(AddOn):
    name = "l1"

    def __init__(self, strength: float, weights: list[torch.Tensor]):
        self.strength, self.weights = strength, weights
        log.info("L1 penalty %g on %d head weight tensors (%d values)", strength, len(weights),
                 sum(p.numel() for p in weights))

    def extra_loss(self, batch, outputs) -> torch.Tensor:
        return self.strength * sum(p.abs().sum() for p in self.weights)
