"""Optimizer and schedule: AdamW with no weight decay on norms, biases and embeddings; warmup, then
cosine (images) or linear (text) decay."""

from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn

from .models import Backbone
from .models.groups import layer_groups

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


def param_groups(backbone: Backbone, weight_decay: float, layer_decay: float | None = None,
                 head_lr_mult: float = 1.0) -> list[dict]:
    """Every parameter (frozen ones too: a strategy may unfreeze them later), in the backbone's layer
    groups. Group i of n gets lr_scale = layer_decay ** (n - 1 - i) (the head, last, gets 1), times
    head_lr_mult for the head. 1-D tensors (norms, biases), embedding tables and the model's own
    `no_weight_decay()` names (position embeddings, tokens) get no weight decay."""
    module = backbone.module
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    embeddings = {n for n, m in module.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    params = dict(module.named_parameters())
    groups = layer_groups(backbone)
    out = []
    for i, g in enumerate(groups):
        scale = (layer_decay ** (len(groups) - 1 - i) if layer_decay else 1.0) * (head_lr_mult if g.is_head else 1.0)
        decay, no_decay = [], []
        for name in g.params:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            plain = params[name].ndim <= 1 or name in skip or owner in embeddings or name.endswith(".bias")
            (no_decay if plain else decay).append(params[name])
        for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if members:
                out.append({"params": members, "weight_decay": wd, "lr_scale": scale, "group": g.name})
    return out


def build_optimizer(backbone: Backbone, lr: float, weight_decay: float, *, layer_decay: float | None = None,
                    head_lr_mult: float = 1.0, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. Every group's own lr is the base lr; timm's schedulers multiply it by the
    group's lr_scale at every update (a strategy phase changes lr_scale, never the schedule)."""
    groups = param_groups(backbone, weight_decay, layer_decay, head_lr_mult)
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
    lr = optimizer.defaults["lr"]  # the base lr; each group's lr_scale is applied by the scheduler
    common = dict(t_initial=total - warmup, lr_min=lr * min_lr_ratio, warmup_t=warmup, warmup_lr_init=lr * 1e-3,
                  warmup_prefix=True, t_in_epochs=False)
    if kind == "linear":
        return PolyLRScheduler(optimizer, power=1.0, **common)
    return CosineLRScheduler(optimizer, **common)
