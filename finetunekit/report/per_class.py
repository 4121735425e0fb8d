"""Per-class precision, recall and F1 (metrics.json's `per_class` / `per_label`), with each class's support,
lowest F1 first."""

from __future__ import annotations

from .labels import confusion, label_set
from .page import Section, esc, table
from .run_files import RunFiles

ID, TITLE = "per-class", "Per-class precision, recall, F1"


def section(run: RunFiles) -> Section | None:
    if run.kind not in ("classification", "multilabel"):
        return None
    key = "per_class" if run.kind == "classification" else "per_label"
    parts = []
    for split in run.splits or ["val"]:
        figures = (run.scores(split) or {}).get(key)
        if not isinstance(figures, dict) or not figures:
            continue
        support = _support(run, split)
        rows = [[c, f.get("precision"), f.get("recall"), f.get("f1"), support.get(c, "")]
                for c, f in sorted(figures.items(), key=lambda cf: cf[1].get("f1", 0.0))]
        parts.append(f"<h3>{esc(split)}</h3>" + table(["class", "precision", "recall", "F1", "support"], rows, 3))
    if not parts:
        return Section.note(ID, TITLE, f"metrics.json has no {key} figures" if run.metrics is not None
                            else run.note("metrics.json"))
    return Section(ID, TITLE, "".join(parts))


def _support(run: RunFiles, split: str) -> dict[str, int]:
    if run.kind == "classification":
        found = confusion(run, split)
        return {c: sum(row) for c, row in zip(run.classes, found[0])} if found else {}
    rows = run.predictions(split) or []
    out: dict[str, int] = {}
    for r in rows:
        for c in label_set(r.get("label")):
            out[c] = out.get(c, 0) + 1
    return out
