"""The most confused pairs: single-label, the largest off-diagonal cells of the confusion matrix; multi-label,
the (missed label, wrongly predicted label) pairs that occur together most often in one sample."""

from __future__ import annotations

from collections import Counter

from .labels import confusion, label_set
from .page import Section, esc, table
from .run_files import RunFiles

ID, TITLE = "confused", "Most confused pairs"
TOP = 10


def section(run: RunFiles) -> Section | None:
    if run.kind not in ("classification", "multilabel"):
        return None
    parts = []
    for split in run.splits or ["val"]:
        if run.kind == "classification":
            found = confusion(run, split)
            if found is None:
                continue
            m = found[0]
            pairs = sorted(((m[i][j], i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i][j]),
                           reverse=True)[:TOP]
            rows = [[run.classes[i], run.classes[j], n, n / sum(m[i])] for n, i, j in pairs]
            header = ["true", "predicted as", "samples", "share of the true class"]
        else:
            preds = run.predictions(split)
            if not preds:
                continue
            pairs = Counter()
            for r in preds:
                truth, pred = label_set(r.get("label")), label_set(r.get("prediction"))
                pairs.update((a, b) for a in truth - pred for b in pred - truth)
            rows = [[a, b, n] for (a, b), n in pairs.most_common(TOP)]
            header = ["missed label", "predicted instead", "samples"]
        parts.append(f"<h3>{esc(split)}</h3>" + (table(header, rows, 3) if rows else
                                                 '<p class="note">No confusions.</p>'))
    if not parts:
        why = "no confusion matrix in metrics.json and no predictions file" if run.kind == "classification" \
            else run.note("val_predictions.csv")
        return Section.note(ID, TITLE, why)
    return Section(ID, TITLE, "".join(parts))
