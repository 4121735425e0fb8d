"""Regression: predicted against true values and the residuals' histogram, from the predictions file."""

from __future__ import annotations

from . import plots
from .page import Section, esc
from .run_files import RunFiles, number

ID, TITLE = "regression", "Predictions against targets"


def section(run: RunFiles) -> Section | None:
    if run.kind != "regression":
        return None
    parts = []
    for split in run.splits or ["val"]:
        rows = run.predictions(split)
        pairs = [(t, p) for r in rows or [] if (t := number(r.get("label"))) is not None
                 and (p := number(r.get("prediction"))) is not None]
        if not pairs:
            continue
        true, pred = zip(*pairs)
        parts.append(f"<h3>{esc(split)} ({len(pairs):,} samples)</h3><div class=\"figs\">"
                     f"{plots.scatter(true, pred, f'{split}: predicted vs true')}"
                     f"{plots.histogram([p - t for t, p in pairs], f'{split}: residuals', 'predicted - true')}</div>")
    if not parts:
        return Section.note(ID, TITLE, run.note("val_predictions.csv"))
    return Section(ID, TITLE, "".join(parts))
