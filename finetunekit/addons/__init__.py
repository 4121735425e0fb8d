"""Add-ons: plain objects with named hooks (addons/base.py), one module each. ADDONS is the registry;
build.addons decides from the recipe which ones a run gets, and in what order their hooks run."""

from __future__ import annotations

from .base import AddOn, AddOns
from .distill import Distill
from .domain_adapt import DomainAdapt
from .ema import EMA
from .grad_checkpointing import GradCheckpointing
from .l1 import L1Penalty
from .merge import Merge
from .mixup import MixUp
from .qat import QAT
from .sync_bn import SyncBN
from .tta import TTA

__all__ = ["ADDONS", "AddOn", "AddOns"]

# name -> class; OPTIONS names the recipe option that switches each on (checked in tests/test_registries.py)
ADDONS: dict[str, type[AddOn]] = {"ema": EMA, "mixup": MixUp, "l1": L1Penalty, "tta": TTA,
                                  "grad-checkpointing": GradCheckpointing, "qat": QAT, "distill": Distill,
                                  "merge": Merge, "sync-bn": SyncBN, "domain-adapt": DomainAdapt}
OPTIONS = {"ema": ("train.ema",), "mixup": ("data.mixup", "data.cutmix"), "l1": ("train.l1_penalty",),
           "tta": ("data.tta",), "grad-checkpointing": ("train.grad_checkpointing",),
           "qat": ("train.qat", "train.max_accuracy_drop"),
           "distill": ("train.teacher", "train.kd_alpha", "train.kd_temperature", "train.kd_hard", "train.kd_cache"),
           "merge": ("train.merge",), "sync-bn": ("train.sync_bn",),
           "domain-adapt": ("train.domain_adapt", "data.target_data", "train.da_weight")}
