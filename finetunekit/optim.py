"""Optimizer and schedule: AdamW with no weight decay on norms, biases and embeddings; warmup, then
cosine (images) or linear (text) decay."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn

# A batch of 64 is the reference for the default learning rates (scaled linearly with the effective batch).
REFERENCE_BATCH = 64
DEFAULT_LR = {("image", "full"): 1e-3, ("image", "linear-probe"): 1e-2,
              ("text", "full"): 1e-4, ("text", "linear-probe"): 2e-3}
DEFAULT_SCHEDULER = {"image": "cosine", "text": "linear"}
DEFAULT_MIN_LR_RATIO = {"cosine": 0.01, "linear": 0.0}


def default_lr(modality: str, strategy: str, effective_batch: int) -> float:
    return DEFAULT_LR[modality, strategy] * effective_batch / REFERENCE_BATCH


def default_warmup(modality: str, epochs: int) -> float:
    """In epochs: one for images; 10% of the run for text (BERT's recipe)."""
    return 1.0 if modality == "image" else 0.1 * epochs


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; 1-D tensors (norms, biases) and the model's own
    `no_weight_decay()` names (position embeddings, tokens) get no decay."""
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, epochs: int, updates_per_epoch: int,
                    warmup_epochs: float, min_lr_ratio: float):
    """Per-update linear warmup from ~0 to lr, then `kind` (cosine | linear) decay to lr * min_lr_ratio at
    the last update.

    Step it with `step_update(num_updates)` after each optimizer step.
    """
    total = max(1, epochs * updates_per_epoch)
    warmup = min(total - 1, math.ceil(warmup_epochs * updates_per_epoch))
    lr = optimizer.param_groups[0]["lr"]
    common = dict(t_initial=total - warmup, lr_min=lr * min_lr_ratio, warmup_t=warmup, warmup_lr_init=lr * 1e-3,
                  warmup_prefix=True, t_in_epochs=False)
    if kind == "linear":
        return PolyLRScheduler(optimizer, power=1.0, **common)
    return CosineLRScheduler(optimizer, **common)
