"""Warnings about the data a run was given that still lets it train: a validation set too small to pick the best
epoch by, a validation set without a class the training set has, test images byte-identical to training images.
Each is one log line (`warning: ...`); the run counts its warning lines into metrics.json (`warnings`).

Validation images identical to training images are checkpoint.content_hash's (it reads the digests anyway);
a manifest that gives one file two labels is data.sources' (an error for single-label data; a warning for
multi-label and regression tables).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .filehash import sha256_file

log = logging.getLogger("finetunekit")

MIN_VAL_SAMPLES = 50  # fewer: one sample moves accuracy by more than 2 points
MIN_VAL_PER_CLASS = 5  # fewer: a class's recall moves by 20 points or more per sample


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_validation(kind: str, classes: Sequence[str], train_targets: Sequence, val_targets: Sequence,
                     val_size: int) -> list[str]:
    """The warning lines about the validation set (logged here too): tiny, or missing a class of the training set.
    kind: classification (targets: class indices) | multilabel (multi-hot rows) | regression | detection."""
    lines = []
    if val_size < MIN_VAL_SAMPLES:
        lines.append(f"the validation set has {val_size} samples (< {MIN_VAL_SAMPLES}): its scores are noisy, and "
                     f"so is the choice of the best epoch (give --val more data, or raise --val-fraction)")
    if kind in ("classification", "multilabel") and classes and val_targets:
        try:
            if kind == "classification":
                train_n, val_n = Counter(int(t) for t in train_targets), Counter(int(t) for t in val_targets)
            else:  # a label counts where it is on
                train_n = Counter(i for row in train_targets for i, v in enumerate(row) if v > 0.5)
                val_n = Counter(i for row in val_targets for i, v in enumerate(row) if v > 0.5)
        except (TypeError, ValueError):  # targets of another form (shard labels by name): no per-class check
            train_n = val_n = Counter()
        noun = ("class", "classes") if kind == "classification" else ("label", "labels")
        missing = [classes[i] for i in range(len(classes)) if train_n[i] and not val_n[i]]
        if missing:
            lines.append(f"the validation set has no samples of {len(missing)} {noun[len(missing) > 1]} the "
                         f"training set has ({_names(missing)}): its scores say nothing about "
                         f"{'them' if len(missing) > 1 else 'it'}")
        few = [f"{classes[i]} {val_n[i]}" for i in range(len(classes)) if 0 < val_n[i] < MIN_VAL_PER_CLASS]
        if few:
            lines.append(f"the validation set has fewer than {MIN_VAL_PER_CLASS} samples of {len(few)} "
                         f"{noun[len(few) > 1]} ({_names(few)}): their per-class scores are noisy")
    for line in lines:
        log.warning("warning: %s", line)
    return lines


def check_test_leakage(train: Sequence[Path], test: Sequence[Path]) -> int:
    """How many test files are byte-identical to a training file (logged as a warning when any): the digests are
    the start-up scan's (filehash), so this reads no file twice."""
    if not train or not test:
        return 0
    seen = {sha256_file(p) for p in train}
    leaked = sum(sha256_file(p) in seen for p in test)
    if leaked:
        log.warning("warning: %d test images are byte-identical to training images (leakage: test scores will be "
                    "optimistic)", leaked)
    return leaked
