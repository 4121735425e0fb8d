"""The confusion matrix: counts and row-normalized, per evaluated split (single-label); per label at the
decision threshold, with the threshold stated (multi-label)."""

from __future__ import annotations

from . import plots
from .labels import confusion, multilabel_counts, normalized, threshold
from .page import Section, esc, table
from .run_files import RunFiles

ID, TITLE = "confusion", "Confusion matrix"


def section(run: RunFiles) -> Section | None:
    if run.kind == "classification":
        return _single(run)
    if run.kind == "multilabel":
        return _multi(run)
    return None


def _single(run: RunFiles) -> Section:
    parts = []
    for split in run.splits or ["val"]:
        found = confusion(run, split)
        if found is None:
            parts.append(f'<p class="note">{split}: no confusion matrix in metrics.json and '
                         f'{esc(run.note(f"{split}_predictions.csv"))}.</p>')
            continue
        matrix, source = found
        total = sum(map(sum, matrix))
        parts.append(f"<h3>{split} ({total:,} samples; from {esc(source)})</h3><div class=\"figs\">"
                     f"{plots.heatmap(matrix, run.classes, f'{split}: counts', counts=True)}"
                     f"{plots.heatmap(normalized(matrix), run.classes, f'{split}: row-normalized (recall)', counts=False)}"
                     f"</div>")
    if not any(p.startswith("<h3>") for p in parts):
        return Section.note(ID, TITLE, "no confusion matrix in metrics.json and no predictions file")
    return Section(ID, TITLE, "<p>Rows: the true class; columns: the predicted class. Row-normalized: each row "
                   "divided by its class's samples, the diagonal is the class's recall.</p>" + "".join(parts))


def _multi(run: RunFiles) -> Section:
    t = threshold(run)
    parts = []
    for split in run.splits or ["val"]:
        rows = run.predictions(split)
        if not rows:
            parts.append(f'<p class="note">{split}: {esc(run.note(f"{split}_predictions.csv"))}.</p>')
            continue
        counts = multilabel_counts(rows, run.classes)
        body = []
        for c, k in counts.items():
            pos, neg = k["tp"] + k["fn"], k["fp"] + k["tn"]
            body.append([c, k["tp"], k["fn"], k["fp"], k["tn"], k["tp"] / pos if pos else 0.0,
                         k["fn"] / pos if pos else 0.0, k["fp"] / neg if neg else 0.0, k["tn"] / neg if neg else 0.0])
        parts.append(f"<h3>{split} ({len(rows):,} samples)</h3>" + table(
            ["label", "TP", "FN", "FP", "TN", "TP/pos", "FN/pos", "FP/neg", "TN/neg"], body, digits=3))
    if not any(p.startswith("<h3>") for p in parts):
        return Section.note(ID, TITLE, run.note("val_predictions.csv"))
    stated = f"{t:g}" if t is not None else "not recorded"
    return Section(ID, TITLE, f"<p>Multi-label: one 2&times;2 matrix per label, a label predicted when its "
                   f"probability is above the threshold <b>{stated}</b>. Counts, then each row divided by its "
                   f"size (pos: samples with the label, neg: without).</p>" + "".join(parts))
