"""Detection: per-class average precision (metrics.json) and a montage of predictions drawn on the images
(detection_predictions: true boxes green, predicted red; inference.draw_boxes), the images with the most
errors (missed + false positives) first.

A boxes cell of the predictions file is JSON: a list of [x1, y1, x2, y2] (px), optionally followed by a score,
or of objects {"box": [x1, y1, x2, y2], "label": ..., "score": ...}."""

from __future__ import annotations

import json

from .page import Section, esc, img, table
from .run_files import RunFiles, number
from .thumbnails import fit, locate

ID_AP, TITLE_AP = "per-class-ap", "Per-class average precision"
ID_MONTAGE, TITLE_MONTAGE = "montage", "Predictions"
MONTAGE, SIDE = 6, 320  # images in the montage, their longer side in px


def ap_section(run: RunFiles) -> Section | None:
    if run.kind != "detection":
        return None
    parts = []
    for split in run.splits or ["val"]:
        s = run.scores(split) or {}
        per = s.get("per_class")
        if not isinstance(per, dict) or not per:
            continue
        rows = [[c, f.get("ap")] for c, f in sorted(per.items(), key=lambda cf: cf[1].get("ap", 0.0))]
        totals = ", ".join(f"{k} {s[k]:.4f}" for k in ("map50", "map", "map75", "mar") if isinstance(s.get(k), float))
        parts.append(f"<h3>{esc(split)}: {esc(totals)}</h3>" + table(["class", "AP (IoU 0.50:0.95)"], rows, 4))
    if not parts:
        return Section.note(ID_AP, TITLE_AP, "metrics.json has no per-class AP" if run.metrics is not None
                            else run.note("metrics.json"))
    definition = next((s.get("ap_definition") for sp in run.splits if (s := run.scores(sp) or {})), None)
    return Section(ID_AP, TITLE_AP, (f"<p>{esc(definition)}.</p>" if definition else "") + "".join(parts))


def parse_boxes(cell: str | None) -> tuple[list[list[float]], list[str]]:
    """(boxes, their labels: 'label score' where given) from a boxes cell; ([], []) when empty or unreadable."""
    try:
        items = json.loads(cell) if cell and cell.strip() else []
    except json.JSONDecodeError:
        return [], []
    boxes, labels = [], []
    for it in items if isinstance(items, list) else []:
        box, label, score = (it.get("box") or it.get("boxes"), it.get("label"), it.get("score")) \
            if isinstance(it, dict) else (it[:4] if isinstance(it, list) else None, None,
                                          it[4] if isinstance(it, list) and len(it) > 4 else None)
        if not isinstance(box, list) or len(box) != 4 or any(number(v) is None for v in box):
            continue
        boxes.append([float(v) for v in box])
        text = " ".join(x for x in (str(label) if label is not None else "",
                                    f"{float(score):.2f}" if number(score) is not None else "") if x)
        labels.append(text)
    return boxes, labels


def _errors(r: dict) -> float:
    return (number(r.get("missed")) or 0) + (number(r.get("false_positives")) or 0)


def montage_section(run: RunFiles) -> Section | None:
    if run.kind != "detection":
        return None
    split = next((s for s in ("val", "test") if run.predictions(s)), None)
    if split is None:
        return Section.note(ID_MONTAGE, TITLE_MONTAGE, run.note("val_predictions.csv"))
    from ..imagefiles import load_rgb
    from ..inference import draw_boxes

    rows = sorted(run.predictions(split), key=_errors, reverse=True)
    tiles = []
    for r in rows[:MONTAGE]:
        path = locate(r.get("item", ""), run.path)
        if path is None:
            tiles.append(f'<div class="tile"><p class="note">{esc(r.get("item", ""))}: file not found</p></div>')
            continue
        image = load_rgb(path)
        width = max(2, round(max(image.size) / SIDE * 2))
        true, _ = parse_boxes(r.get("true_boxes"))
        pred, labels = parse_boxes(r.get("predicted_boxes"))
        image = draw_boxes(image, true, None, "#1a7f37", width)
        image = draw_boxes(image, pred, labels if any(labels) else None, "#cf222e", width)
        image = fit(image, SIDE)
        counts = ", ".join(f"{k.replace('_', ' ')} {r[k]}" for k in ("true_positives", "false_positives", "missed")
                           if r.get(k) not in (None, ""))
        tiles.append(f'<div class="tile">{img(image, path.name, r.get("item", ""))}<div>{esc(path.name)}: '
                     f"{esc(counts)}</div></div>")
    legend = ('<p><span class="legend-true">green</span>: true boxes; <span class="legend-pred">red</span>: predicted '
              f"(label and score). The {len(tiles)} {split} images with the most errors (missed + false positives), of "
              f"{len(rows):,}.</p>")
    return Section(ID_MONTAGE, TITLE_MONTAGE, legend + '<div class="montage">' + "".join(tiles) + "</div>")
