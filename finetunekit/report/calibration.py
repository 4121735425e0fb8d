"""Calibration: the reliability diagram and the expected calibration error (ECE), before and after temperature
scaling, from the predictions file; and metrics.json's `calibration` figures.

Single-label (top-label calibration): each sample's confidence is its predicted class's probability,
`score_uncalibrated` before and `score` after; it is right when label == prediction. Multi-label: every
(sample, label) probability `p_CLASS` against whether the sample has that label. 15 equal-width bins over
[0, 1] (a bin holds low < confidence <= high; the first also 0); ECE = sum over bins of
(samples in the bin / all samples) x |accuracy in the bin - mean confidence in the bin|."""

from __future__ import annotations

import math
from collections.abc import Sequence

from . import plots
from .labels import label_set
from .page import Section, esc, kv
from .run_files import RunFiles, number

ID, TITLE = "calibration", "Calibration"
BINS = 15
NAMES = {"temperature": "temperature", "ece_before": "ECE before", "ece_after": "ECE after",
         "nll_before": "NLL before", "nll_after": "NLL after"}


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = BINS) -> list[dict]:
    """Per bin: low, high, count, mean confidence, accuracy (0 where empty)."""
    sums = [[0, 0.0, 0] for _ in range(bins)]  # count, confidence sum, right
    for c, ok in zip(confidence, correct):
        i = min(bins - 1, max(0, math.ceil(c * bins) - 1))  # the bin (low, high]
        s = sums[i]
        s[0] += 1
        s[1] += c
        s[2] += bool(ok)
    return [{"low": i / bins, "high": (i + 1) / bins, "count": n,
             "confidence": total / n if n else 0.0, "accuracy": right / n if n else 0.0}
            for i, (n, total, right) in enumerate(sums)]


def ece(bins: list[dict]) -> float:
    n = sum(b["count"] for b in bins)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins) if n else float("nan")


def _pairs(rows: list[dict], column: str) -> tuple[list[float], list[bool]]:
    conf, right = [], []
    for r in rows:
        c = number(r.get(column))
        if c is not None:
            conf.append(c)
            right.append(r.get("label") == r.get("prediction"))
    return conf, right


def _multilabel_pairs(rows: list[dict], classes: list[str]) -> tuple[list[float], list[bool]]:
    conf, right = [], []
    for r in rows:
        truth = label_set(r.get("label"))
        for c in classes:
            p = number(r.get(f"p_{c}"))
            if p is not None:
                conf.append(p)
                right.append(c in truth)
    return conf, right


def section(run: RunFiles) -> Section | None:
    if run.kind not in ("classification", "multilabel"):
        return None
    parts = []
    recorded = (run.metrics or {}).get("calibration")
    if isinstance(recorded, dict) and recorded:
        rows = [(NAMES.get(k, k), v) for k, v in recorded.items() if isinstance(v, (int, float, str))]
        parts.append("<h3>Recorded by the run (metrics.json)</h3>" + kv(rows, 4))
    else:
        parts.append('<p class="note">metrics.json has no calibration figures (no temperature scaling recorded).</p>')
    drawn = False
    for split in run.splits or ["val"]:
        rows = run.predictions(split)
        if not rows:
            continue
        if run.kind == "classification":
            panels = [(f"{split}: {label}", *_pairs(rows, column)) for label, column in
                      (("before calibration", "score_uncalibrated"), ("after calibration", "score"))]
        else:
            panels = [(f"{split}: label probabilities", *_multilabel_pairs(rows, run.classes))]
        panels = [(t, reliability_bins(c, r)) for t, c, r in panels if c]
        if not panels:
            parts.append(f'<p class="note">{esc(split)}: the predictions file has no score columns.</p>')
            continue
        drawn = True
        figures = ", ".join(f"{t.split(': ')[1]} {ece(b):.4f}" for t, b in panels)
        parts.append(f"<h3>{esc(split)}: ECE {esc(figures)} ({BINS} bins, {sum(x['count'] for x in panels[0][1]):,} "
                     f"{'samples' if run.kind == 'classification' else 'sample-label pairs'})</h3>"
                     f'<div class="figs">{plots.reliability(panels)}</div>')
    if not drawn:
        parts.append(f'<p class="note">Reliability diagram omitted: {esc(run.note("val_predictions.csv"))}.</p>')
    intro = ("<p>Top-label reliability: samples binned by the predicted class's probability; a calibrated model's "
             "bars reach the diagonal.</p>" if run.kind == "classification" else
             "<p>Every label's probability binned; the bar is the share of those sample-label pairs where the label "
             "is true.</p>")
    return Section(ID, TITLE, intro + "".join(parts))
