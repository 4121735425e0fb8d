"""What the image and text readers share: class order, task kinds, column lookup, the held-out splits, the
classes of a labelled table and the targets of its rows. data.sources and data.tables both import this
module; it imports neither."""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from typing import Any

from ..config import TASK_KIND
from ..errors import UserError


def class_sort_key(name: str) -> tuple:
    """Natural order: '2' before '10', numbers before words."""
    return (0, int(name), name) if re.fullmatch(r"-?[0-9]+", name) else (1, 0, name)


def stratified_split(labels: list[str], fraction: float, seed: int) -> list[bool]:
    """Mark about `fraction` of each class (at least one where a class has two or more) as held out."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    rng = random.Random(seed)
    held = [False] * len(labels)
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        n = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        for i in idx[:n]:
            held[i] = True
    return held


def random_split(n: int, fraction: float, seed: int) -> list[bool]:
    """Mark a seeded random `fraction` of n items (at least one) as held out."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = set(order[:max(1, round(n * fraction))])
    return [i in chosen for i in range(n)]


def task_kind(task: str) -> str:
    """classification | multilabel | regression: what the task's table must hold (config.TASK_KIND)."""
    return TASK_KIND[task]


def lookup(columns: list[str]) -> dict[str, str]:
    """Lower-case name -> the column's own name: columns match case-insensitively."""
    return {c.lower(): c for c in columns}


def check_bad(rows, table, max_bad_fraction: float) -> None:
    """Stop when more than `max_bad_fraction` of a table's rows (tables._Rows of tables.Table) are unusable,
    or none is usable."""
    total = len(rows.texts) + len(rows.bad)
    if rows.bad and len(rows.bad) > max_bad_fraction * total:
        where, reason = rows.bad[0]
        raise UserError(f"{table.origin}: {len(rows.bad)} of {total} rows cannot be used, more than "
                        f"--max-bad-fraction {max_bad_fraction} (first: line {where.rsplit(':', 1)[1]}: {reason})")
    if not rows.texts:
        raise UserError(f"{table.origin}: no usable rows")


def class_names(task: str, label_columns: list[str], labels: list, table) -> list[str]:
    """The classes of a table's parsed labels, in natural order: [] for regression, the label columns for
    several 0/1 columns."""
    if task_kind(task) == "regression":
        return []
    if task_kind(task) == "multilabel" and len(label_columns) > 1:
        return list(label_columns)
    if task_kind(task) == "multilabel":
        counts = Counter(name for names in labels for name in names)
    else:
        counts = Counter(labels)
    classes = sorted(counts, key=class_sort_key)
    if task_kind(task) == "classification" and len(classes) < 2:
        raise UserError(f"{table.origin}: found {len(classes)} class{'es' if not classes else ''} {classes}; "
                        f"classification needs at least 2")
    if task_kind(task) == "multilabel" and not classes:
        raise UserError(f"{table.origin}: no labels found in column {label_columns[0]!r}")
    return classes


def targeter(task: str, classes: list[str], label_columns: list[str]):
    """(parsed label, origin for messages) -> the sample's target: class index, multi-hot list or number."""
    index = {c: i for i, c in enumerate(classes)}

    def target(label: Any, origin: str):
        if task_kind(task) == "regression" or (task_kind(task) == "multilabel" and len(label_columns) > 1):
            return label
        names = label if task_kind(task) == "multilabel" else [label]
        unknown = [n for n in names if n not in index]
        if unknown:
            raise UserError(f"{origin}: label {unknown[0]!r} is not in the training data (classes: {classes})")
        if task_kind(task) == "classification":
            return index[label]
        hot = [0.0] * len(classes)
        for n in names:
            hot[index[n]] = 1.0
        return hot

    return target
