"""Top losses: the samples with the highest per-sample loss in the predictions file (val, else test), as
thumbnails of the original, un-augmented image files (with an explanation overlay where finetunekit.explain
exists: explain_hook.py) or as the texts."""

from __future__ import annotations

from pathlib import Path

from .explain_hook import Explainer
from .page import Raw, Section, esc, img, table
from .run_files import RunFiles, number
from .thumbnails import fit, locate, thumbnail

ID, TITLE = "top-losses", "Top losses"
IMAGES, TEXTS = 24, 20  # caps: the report stays a few MB at most
TEXT_CHARS = 400


def section(run: RunFiles, explainer: Explainer | None = None) -> Section | None:
    if run.kind not in ("classification", "multilabel", "regression"):
        return None
    split = next((s for s in ("val", "test") if run.predictions(s)), None)
    if split is None:
        return Section.note(ID, TITLE, run.note("val_predictions.csv"))
    rows = [r for r in run.predictions(split) if number(r.get("loss")) is not None]
    if not rows:
        return Section.note(ID, TITLE, f"{split}_predictions.csv has no loss column")
    rows.sort(key=lambda r: number(r["loss"]), reverse=True)
    intro = f"<p>The {{n}} {split} samples with the highest loss, of {len(rows):,}.</p>"
    if run.modality == "text":
        top = rows[:TEXTS]
        return Section(ID, TITLE, intro.format(n=len(top)) + _texts(run, top))
    top = rows[:IMAGES]
    explain = (explainer or Explainer(run.path)) if run.kind == "classification" else None
    return Section(ID, TITLE, intro.format(n=len(top)) + _tiles(run, top, explain))


def _outcome(run: RunFiles, r: dict) -> tuple[str, str, bool]:
    """(true, predicted, wrong) as shown."""
    if run.kind == "regression":
        t, p = number(r.get("label")), number(r.get("prediction"))
        return (f"{t:.4g}" if t is not None else r.get("label", ""), f"{p:.4g}" if p is not None else
                r.get("prediction", ""), True)
    t, p = r.get("label", ""), r.get("prediction", "")
    return t.replace(";", ", ") or "(none)", p.replace(";", ", ") or "(none)", t != p


def _score(r: dict) -> str:
    s = number(r.get("score"))
    return f" ({s:.2f})" if s is not None else ""


def _tiles(run: RunFiles, rows: list[dict], explain: Explainer | None) -> str:
    tiles = []
    for r in rows:
        item = r.get("item", "")
        truth, pred, wrong = _outcome(run, r)
        path = locate(item, run.path)
        pictures = ""
        if path is None:
            pictures = f'<p class="note">{esc(Path(item).name)}: file not found</p>'
        else:
            try:
                pictures = img(thumbnail(path), alt=path.name, title=item)
                overlay = explain(path) if explain is not None else None
                if overlay is not None:
                    pictures += img(fit(overlay.convert("RGB")), alt=f"explanation of {path.name}")
            except Exception as e:  # noqa: BLE001 - one unreadable file is one tile's note
                pictures = f'<p class="note">{esc(path.name)}: cannot read ({esc(type(e).__name__)})</p>'
        cls = ' class="wrong"' if wrong else ""
        tiles.append(f'<div class="tile"><div class="pair">{pictures}</div>'
                     f"<div>true: <b>{esc(truth)}</b></div><div{cls}>predicted: <b>{esc(pred)}</b>{esc(_score(r))}</div>"
                     f"<div>loss {number(r['loss']):.3f}</div></div>")
    return '<div class="grid">' + "".join(tiles) + "</div>"


def _texts(run: RunFiles, rows: list[dict]) -> str:
    body = []
    for r in rows:
        truth, pred, _ = _outcome(run, r)
        text = r.get("item", "")
        text = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"
        body.append([Raw(esc(text)), truth, Raw(f"<b>{esc(pred)}</b>{esc(_score(r))}"), number(r["loss"])])
    return table(["text", "true", "predicted (score)", "loss"], body, 3)
