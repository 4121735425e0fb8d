"""Learning curves from history.csv: loss, the validation metrics (and the training figure), the learning
rate and the gradient norm, per epoch. EMA columns (`val_ema_*`) are drawn dashed beside the raw weights'."""

from __future__ import annotations

from . import plots
from .page import Section
from .run_files import RunFiles, number

ID, TITLE = "curves", "Learning curves"


def _series(rows: list[dict], column: str) -> list[float | None]:
    return [number(r.get(column)) for r in rows]


def section(run: RunFiles) -> Section:
    rows = run.history
    if not rows:
        return Section.note(ID, TITLE, run.note("history.csv"))
    columns = list(rows[0])
    epochs = [number(r.get("epoch")) or i + 1 for i, r in enumerate(rows)]
    ema = {c for c in columns if c.startswith("val_ema_")}
    figs = []

    def curve(label: str, column: str, style: str = "-"):
        return (label, epochs, _series(rows, column), style)

    losses = [curve(c.removesuffix("_loss").replace("_", " ") + " loss", c, "--" if c in ema else "-")
              for c in ("train_loss", "val_loss", "val_ema_loss") if c in columns]
    if losses:
        figs.append(plots.line_chart(losses, "Loss", "loss", log=False))
    raw = [c for c in columns if c.startswith("val_") and c not in ema and c != "val_loss"]
    metrics = []
    for c in raw:
        metrics.append(curve(c.replace("_", " "), c))
        twin = "val_ema_" + c.removeprefix("val_")
        if twin in ema:
            metrics.append(curve(twin.replace("_", " "), twin, "--"))
    metrics += [curve(c.replace("_", " "), c, ":") for c in columns
                if c.startswith("train_") and c not in ("train_loss", "train_samples_per_s")]
    if metrics:
        figs.append(plots.line_chart(metrics, "Metrics", "value"))
    if "lr" in columns:
        figs.append(plots.line_chart([curve("lr (head)", "lr")], "Learning rate", "lr", log=True))
    if "grad_norm" in columns:
        figs.append(plots.line_chart([curve("grad norm", "grad_norm")], "Gradient norm (before clipping)", "norm"))
    best = (run.metrics or {}).get("best_epoch")
    count = f"{len(rows)} epoch{'' if len(rows) == 1 else 's'}"
    note = f"<p>{count}; the saved model is from epoch {best}.</p>" if best else f"<p>{count}.</p>"
    return Section(ID, TITLE, note + '<div class="figs">' + "".join(figs) + "</div>")
