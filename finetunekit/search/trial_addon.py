"""The add-on through which a search trial sees its run: after each epoch it reports the monitored validation
metric to the optuna trial and asks the pruner whether to go on (addons/base.py's `after_epoch` hook).

It is handed to `run.fit(..., addons=[...])` by the search, not switched on by a recipe option, so it is not
in addons.ADDONS. Under several processes only rank 0 holds the trial (it alone talks to the storage); its
decision reaches the other ranks by a broadcast, so every rank stops after the same epoch.
"""

from __future__ import annotations

import logging
import math

from ..addons.base import AddOn
from . import ranks

log = logging.getLogger("finetunekit")


class TrialReport(AddOn):
    name = "trial"

    def __init__(self, trial, monitor: str):
        self.trial, self.monitor = trial, monitor  # trial: None on ranks other than 0
        self.pruned_at: int | None = None  # the epoch after which the pruner stopped the run
        self.reported: dict[int, float] = {}

    def after_epoch(self, epoch: int, val: dict) -> bool:
        value = float(val[self.monitor])
        prune = False
        if self.trial is not None:
            if math.isfinite(value):  # optuna refuses nan; a non-finite epoch is simply not reported
                self.trial.report(value, step=epoch)
                self.reported[epoch] = value
            prune = bool(self.trial.should_prune())  # (a numpy bool from some pruners)
        prune = ranks.share(prune)
        if prune:
            self.pruned_at = epoch
            log.info("search: trial %s pruned after epoch %d (val %s %.4f)",
                     getattr(self.trial, "number", "?"), epoch, self.monitor, value)
        return prune

    def finish(self, best, folder, score) -> dict:
        return {"search": {"pruned_after_epoch": self.pruned_at}} if self.pruned_at is not None else {}
