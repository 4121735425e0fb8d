"""Counting from what a run recorded: the single-label confusion matrix (metrics.json's, or counted from the
predictions file), and per-label counts of a multi-label predictions file at its threshold."""

from __future__ import annotations

from .run_files import RunFiles


def label_set(cell: str | None) -> set[str]:
    """A multi-label cell: class names joined with ';' (empty: no label)."""
    return {part.strip() for part in (cell or "").split(";") if part.strip()}


def confusion(run: RunFiles, split: str) -> tuple[list[list[int]], str] | None:
    """(matrix rows true x columns predicted, where it came from), or None."""
    scores = run.scores(split) or {}
    m = scores.get("confusion_matrix")
    classes = run.classes
    if isinstance(m, list) and len(m) == len(classes) and classes:
        return [[int(v) for v in row] for row in m], "metrics.json"
    rows = run.predictions(split)
    if not rows or not classes:
        return None
    index = {c: i for i, c in enumerate(classes)}
    out = [[0] * len(classes) for _ in classes]
    for r in rows:
        t, p = index.get(r.get("label", "")), index.get(r.get("prediction", ""))
        if t is not None and p is not None:
            out[t][p] += 1
    return out, f"{split}_predictions.csv"


def normalized(matrix: list[list[int]]) -> list[list[float]]:
    """Each row divided by its sum (the share of each true class predicted as each class)."""
    return [[v / s if (s := sum(row)) else 0.0 for v in row] for row in matrix]


def multilabel_counts(rows: list[dict], classes: list[str]) -> dict[str, dict[str, int]]:
    """Per label: tp, fn, fp, tn over the samples, from the label and prediction sets."""
    out = {c: {"tp": 0, "fn": 0, "fp": 0, "tn": 0} for c in classes}
    for r in rows:
        truth, pred = label_set(r.get("label")), label_set(r.get("prediction"))
        for c in classes:
            key = ("tp" if c in pred else "fn") if c in truth else ("fp" if c in pred else "tn")
            out[c][key] += 1
    return out


def threshold(run: RunFiles) -> float | None:
    for split in run.splits:
        t = (run.scores(split) or {}).get("threshold")
        if isinstance(t, (int, float)):
            return float(t)
    t = (run.recipe.get("train") or {}).get("threshold")
    return float(t) if isinstance(t, (int, float)) else None
