"""Gradient checkpointing (`--grad-checkpointing`): activations inside each block are recomputed in the
backward pass instead of kept, trading compute for memory. The backbone adapter knows how its library
does it (timm's set_grad_checkpointing, transformers' gradient_checkpointing_enable, non-reentrant)."""

from __future__ import annotations

import logging

import torch

from .base import AddOn

log = logging.getLogger("finetunekit")


class GradCheckpointing(AddOn):
    name = "grad-checkpointing"

    def __init__(self, backbone):
        self.backbone = backbone

    def wrap_model(self, module: torch.nn.Module) -> torch.nn.Module:
        self.backbone.adapter.set_grad_checkpointing(self.backbone, True)
        if self.backbone.peft is not None:  # a frozen base: reentrant checkpoints would pass no gradient on
            from ..peft_methods import require_input_grads

            require_input_grads(self.backbone)
        log.info("gradient checkpointing on (activations recomputed in the backward pass)")
        return module
