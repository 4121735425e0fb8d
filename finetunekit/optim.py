"""Optimizer and schedule.

Param groups are the backbone's layer groups (split by weight decay), each with an `lr_scale` (layer decay,
head multiplier, strategy phase) that timm's schedulers apply at every update. Optimizers: torch's AdamW
(fused on GPUs and CPUs), or timm's factory for adam, sgd, nesterov, rmsprop, lamb, lars. Schedules, each after a
linear warmup: cosine, linear, step, onecycle, cosine-restarts, plateau, constant.
"""

from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from torch import nn

from .models import Backbone
from .models.groups import layer_groups

# A batch of 64 is the reference for the default learning rates (scaled linearly with the effective batch).
REFERENCE_BATCH = 64
# Strategies that train only a few tensors from the start (a head, biases, norms) get 10x the full rate.
DEFAULT_LR = {("image", "full"): 1e-3, ("image", "linear-probe"): 1e-2, ("image", "bitfit"): 1e-2,
              ("image", "norm-head"): 1e-2,
              ("text", "full"): 2e-4, ("text", "linear-probe"): 2e-3, ("text", "bitfit"): 1e-3,
              ("text", "norm-head"): 1e-3}
PEFT_LR_MULT = 10.0  # --peft: adapters (and the new head) from scratch on a frozen base, 10x the full rate, as the
# strategies that train a few tensors; every phase (strategies.py: no further 10x for head-only phases)
DEFAULT_SCHEDULER = {"image": "cosine", "text": "linear"}
DEFAULT_MIN_LR_RATIO = {"cosine": 0.01, "linear": 0.0, "onecycle": 1e-4, "cosine-restarts": 0.01, "step": 0.0,
                        "plateau": 1e-3, "constant": 0.0}
OPTIMIZERS = ("adamw", "adam", "sgd", "nesterov", "rmsprop", "lamb", "lars")
_TIMM_NAMES = {"adam": "adam", "sgd": "momentum", "nesterov": "nesterov", "rmsprop": "rmsprop", "lamb": "lamb",
               "lars": "lars"}
_SGD_LIKE = {"sgd", "nesterov", "lars"}  # these want about 10x the learning rate of the Adam family
LARS_LR_MULT = 10.0  # a LARS step moves each tensor by lr x trust_coeff (0.001) of its norm. Measured on digits,
# EfficientNet-Lite0, 2 epochs: at 10x SGD's lr the backbone moved 0.017 relative (AdamW 0.042, the old LARS 7.7e-5);
# at 100x it moved 0.157 and reached 0.26 accuracy


def default_lr(modality: str, strategy: str, effective_batch: int, optimizer: str = "adamw",
               peft: bool = False) -> float:
    mult = 10.0 if optimizer in _SGD_LIKE else 1.0
    if optimizer == "lars":
        mult *= LARS_LR_MULT
    base = DEFAULT_LR.get((modality, strategy), DEFAULT_LR[modality, "full"])  # staged ones: see strategies.py
    if peft:
        base = DEFAULT_LR[modality, "full"] * PEFT_LR_MULT
    return base * mult * effective_batch / REFERENCE_BATCH


def default_warmup(modality: str, epochs: int) -> float:
    """In epochs: one for images (at most a fifth of a short run); 10% of the run for text (BERT's recipe)."""
    return min(1.0, 0.2 * epochs) if modality == "image" else 0.1 * epochs


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
                out.append({"params": members, "weight_decay": wd, "lr_scale": scale, "group": g.name,
                            "head": g.is_head})
    return out


def build_optimizer(backbone: Backbone, lr: float, weight_decay: float, *, name: str = "adamw",
                    momentum: float = 0.9, layer_decay: float | None = None, head_lr_mult: float = 1.0,
                    fused: bool = False) -> torch.optim.Optimizer:
    """`name` over `param_groups`. Every group's own lr is the base lr; timm's schedulers multiply it by the
    group's lr_scale at every update (a strategy phase changes lr_scale, never the schedule)."""
    groups = param_groups(backbone, weight_decay, layer_decay, head_lr_mult)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))
    from timm.optim import create_optimizer_v2

    kwargs = {"momentum": momentum} if name in ("sgd", "nesterov", "rmsprop", "lars") else {}
    if name == "lars":
        groups = lars_groups(groups)
    return create_optimizer_v2(groups, opt=_TIMM_NAMES[name], lr=lr, weight_decay=weight_decay, **kwargs)


def lars_groups(groups: list[dict]) -> list[dict]:
    """LARS scales each tensor's step by trust_coeff (0.001) x |w| / |g|: its default lr is LARS_LR_MULT x SGD's.
    The new head is left out of that adaptation (timm's LARS adapts only groups with weight decay): its
    small initial norm would keep it near zero (measured: 0.08-0.12 accuracy on digits at any lr). It
    trains by plain momentum SGD at SGD's lr, without weight decay; so do norms and biases (no decay
    already), as in the LARS paper."""
    out = []
    for g in groups:
        if g["head"] or g["weight_decay"] == 0:
            g = {**g, "weight_decay": 0.0, "lr_scale": g["lr_scale"] / LARS_LR_MULT}
        out.append(g)
    return out


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, epochs: int, updates_per_epoch: int,
                    warmup_epochs: float, min_lr_ratio: float, restart_epochs: float | None = None,
                    plateau_mode: str = "max"):
    """A linear warmup from ~0 to lr, then `kind`, down to lr * min_lr_ratio:

        cosine / linear     one decay over the rest of the run
        step                x0.1 after each third of the run
        onecycle            cosine from the peak to lr/1e4 (pair it with a long warmup: 30% by default)
        cosine-restarts     cosine cycles of `restart_epochs` (default: a third of the run), each from the peak
        plateau             x0.1 when the validation metric has not improved for 2 epochs
        constant            lr after warmup

    Per-update schedules step with `step_update(num_updates)`; plateau steps with `step(epoch, metric)`.
    The loop calls both: each is a no-op for the other kind.
    """
    total = max(1, epochs * updates_per_epoch)
    warmup = min(total - 1, math.ceil(warmup_epochs * updates_per_epoch))
    lr = optimizer.defaults["lr"]  # the base lr; each group's lr_scale is applied by the scheduler
    common = dict(warmup_t=warmup, warmup_lr_init=lr * 1e-3, warmup_prefix=True, t_in_epochs=False)
    after = total - warmup
    if kind == "linear":
        return PolyLRScheduler(optimizer, t_initial=after, power=1.0, lr_min=lr * min_lr_ratio, **common)
    if kind == "step":
        return StepLRScheduler(optimizer, decay_t=max(1, math.ceil(after / 3)), decay_rate=0.1, **common)
    if kind == "constant":
        return StepLRScheduler(optimizer, decay_t=total + 1, decay_rate=1.0, **common)
    if kind == "cosine-restarts":
        cycle = max(1, round((restart_epochs or epochs / 3) * updates_per_epoch))
        return CosineLRScheduler(optimizer, t_initial=cycle, cycle_limit=max(1, math.ceil(after / cycle)),
                                 lr_min=lr * min_lr_ratio, **common)
    if kind == "plateau":
        return PlateauSchedule(optimizer, lr, warmup, lr_min=lr * min_lr_ratio, mode=plateau_mode)
    return CosineLRScheduler(optimizer, t_initial=after, lr_min=lr * min_lr_ratio, **common)  # cosine, onecycle


class PlateauSchedule:
    """Per-update linear warmup, then x`factor` whenever the validation metric has not improved for
    `patience` epochs. The timm scheduler interface (step_update, step, state_dict), with each group's
    lr_scale applied; its whole state is plain numbers, so it checkpoints and resumes. (timm's own
    PlateauLRScheduler is deprecated because its state is not saved.)"""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, warmup_t: int, *, lr_min: float = 0.0,
                 mode: str = "max", factor: float = 0.1, patience: int = 2, threshold: float = 1e-4):
        self.optimizer, self.lr, self.warmup_t, self.lr_min = optimizer, lr, warmup_t, lr_min
        self.mode, self.factor, self.patience, self.threshold = mode, factor, patience, threshold
        self.scale, self.best, self.stale, self.updates = 1.0, None, 0, 0
        self._apply()

    def _apply(self) -> None:
        warm = min(1.0, (self.updates + 1) / (self.warmup_t + 1)) if self.warmup_t else 1.0
        value = max(self.lr_min, self.lr * self.scale) * warm
        for group in self.optimizer.param_groups:
            group["lr"] = value * group.get("lr_scale", 1.0)

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.updates = num_updates
        self._apply()

    def step(self, epoch: int, metric: float | None = None) -> None:
        if metric is None or not math.isfinite(metric):
            return
        better = self.best is None or (metric > self.best + self.threshold if self.mode == "max"
                                       else metric < self.best - self.threshold)
        if better:
            self.best, self.stale = metric, 0
        else:
            self.stale += 1
            if self.stale >= self.patience:
                self.scale, self.stale = self.scale * self.factor, 0
        self._apply()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "best", "stale", "updates")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()
