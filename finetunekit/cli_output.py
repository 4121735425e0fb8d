"""What the commands print: predictions as a table, CSV or JSON, and metrics with their per-class table and
confusion matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

def write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _rows(preds: list[dict], top_k: int, key: str, kind: str, error_column: bool) -> tuple[list[str], list[list[str]]]:
    """Predictions as a header and rows of strings. key: path | text; kind: label | labels | value (the task);
    an input that could not be read has empty prediction cells and its reason in the `error` column."""
    source = [p.get(key, "") if isinstance(p.get(key, ""), str) else " ||| ".join(p[key]) for p in preds]
    if kind == "boxes":  # detection: one row per box (an image without boxes: one row with empty cells)
        cols = ["label", "score", "x1", "y1", "x2", "y2"]
        rows = []
        for s, p in zip(source, preds):
            boxes = [] if "error" in p else list(zip(p["labels"], p["scores"], p["boxes"]))
            for label, score, box in boxes or [(None, None, None)]:
                cells = [label, f"{score:.4f}", *(f"{v:.1f}" for v in box)] if label is not None else [""] * len(cols)
                rows.append([s, *cells] + ([p.get("error", "")] if error_column else []))
        return [key, *cols] + (["error"] if error_column else []), rows
    if kind == "value":  # regression
        cols, cells = ["value"], lambda p: [f"{p['value']:.6g}"]
    elif kind == "generated":  # seq2seq
        cols, cells = ["generated"], lambda p: [p["generated"]]
    elif kind == "labels":  # multi-label
        cols, cells = ["labels"], lambda p: ["|".join(p["labels"])]
    else:
        cols = ["label", "score"] + [f"{w}{i}" for i in range(2, top_k + 1) for w in ("label", "score")]

        more = [k for k in UNCERTAINTY_COLUMNS if any(k in p for p in preds)]  # predict --uncertainty
        cols += more

        def cells(p: dict) -> list[str]:
            return [v for alt in p["top_k"] for v in (alt["label"], f"{alt['score']:.4f}")] + [
                str(p[k]).lower() if isinstance(p[k], bool) else p[k] if isinstance(p[k], str) else f"{p[k]:.4f}"
                for k in more]
    rows = []
    for s, p in zip(source, preds):
        row = [s] + (cells(p) if "error" not in p else [""] * len(cols))
        rows.append(row + ([p.get("error", "")] if error_column else []))
    return [key, *cols] + (["error"] if error_column else []), rows


UNCERTAINTY_COLUMNS = ("max_prob", "entropy", "ood_score", "ood", "mc_label", "mc_probability", "mc_entropy",
                       "mutual_information", "mc_variance")  # uncertainty.describe's fields, in table order


def format_predictions(preds: list[dict], fmt: str, top_k: int, key: str, kind: str) -> str:
    if fmt == "json":
        return json.dumps(preds, indent=2, ensure_ascii=False) + "\n"
    # images: csv always has the error column (one schema for scripts), the table only when an input failed
    error_column = key == "path" and (fmt == "csv" or any("error" in p for p in preds))
    cols, rows = _rows(preds, top_k, key, kind, error_column)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(cols)
        writer.writerows(rows)
        return buf.getvalue()
    widths = [min(60, max(len(c), *(len(r[i]) for r in rows))) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def print_metrics(metrics: dict) -> None:
    keys = [k for k in ("accuracy", "top5_accuracy", "macro_f1", "micro_f1", "map50", "map", "map75", "mar",
                        "exact_match", "mae", "rmse", "bleu", "chrf", "rouge_l", "generated",
                        "r2", "spearman", "loss", "samples") if k in metrics]
    print("  ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                    for k in keys))
    per_class = metrics.get("per_class") or metrics.get("per_label") or {}
    if per_class:
        width = max(len(c) for c in per_class)
        if all(set(v) == {"ap"} for v in per_class.values()):  # detection
            print(f"{'class':<{width}}  AP@[.5:.95]")
            for c, v in per_class.items():
                print(f"{c:<{width}}  {v['ap']:.4f}")
            return
        print(f"{'class':<{width}}  precision  recall      f1")
        for c, v in per_class.items():
            print(f"{c:<{width}}  {v['precision']:9.4f}  {v['recall']:6.4f}  {v['f1']:6.4f}")
    if metrics.get("confusion_matrix") and metrics.get("confusion_matrix_classes"):
        from .confusion import table

        print("\nconfusion matrix (rows: true class, columns: predicted)")
        print(table(metrics["confusion_matrix"], metrics["confusion_matrix_classes"]), end="")
