"""`finetunekit compare RUN...`: one table of runs of the same task (printed, and in compare.html) and their
learning curves overlaid (the validation metric and the validation loss by epoch, one line per run).

Runs of different tasks are refused (one line naming the two tasks): their metrics do not share columns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .page import Section, esc, render, table
from .run_files import HEADLINE, RunFiles, check_run, number

COMPARE = "compare.html"


@dataclass
class Comparison:
    header: list[str]
    rows: list[list]
    runs: list[RunFiles]
    names: list[str]
    metric: str  # the validation metric the curves show


def collect(paths: list[str | Path]) -> Comparison:
    runs = [RunFiles(check_run(p)) for p in paths]
    tasks = {}
    for name, run in zip(paths, runs):
        if run.task is None:
            raise UserError(f"RUN {name}: no metrics.json or recipe.yaml says its task")
        tasks.setdefault(run.task, name)
    if len(tasks) > 1:
        (a, ra), (b, rb) = list(tasks.items())[:2]
        raise UserError(f"compare: runs of different tasks ({ra} is {a}, {rb} is {b}); compare runs of one task")
    kind = runs[0].kind or "classification"
    headline = HEADLINE[kind]
    splits = [s for s in ("val", "test") if any(r.scores(s) for r in runs)]
    header = ["run", "task", "model", "strategy", "epochs", "best epoch",
              *[f"{s} {k}" for s in splits for k in headline], "wall s", "samples/s"]
    rows = []
    for name, run in zip(paths, runs):
        m = run.metrics or {}
        epochs = m.get("epochs_run", len(run.history or []) or None)
        rows.append([str(name), run.task, m.get("model", (run.recipe.get("model") or {}).get("name")),
                     m.get("strategy", (run.recipe.get("train") or {}).get("strategy")), epochs, m.get("best_epoch"),
                     *[(run.scores(s) or {}).get(k) for s in splits for k in headline],
                     m.get("wall_seconds"), m.get("train_samples_per_s")])
    monitors = {(r.metrics or {}).get("monitor") for r in runs} - {None, "loss"}
    metric = monitors.pop() if len(monitors) == 1 else headline[0]
    return Comparison(header, rows, runs, [str(p) for p in paths], metric)


def _digits(c: Comparison) -> list[int]:
    return [4 if h.startswith(("val ", "test ")) else 1 for h in c.header]


def text_table(c: Comparison) -> str:
    digits = _digits(c)
    cells = [c.header] + [[_cell(v, d) for v, d in zip(row, digits)] for row in c.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(c.header))]
    lines = ["  ".join(v.rjust(w) if i >= 4 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]) + "\n"


def _cell(v, digits: int) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_html(c: Comparison, out: Path) -> Path:
    from . import plots

    def curve(column: str) -> list:
        series = []
        for name, run in zip(c.names, c.runs):
            rows = run.history or []
            series.append((name, [number(r.get("epoch")) or i + 1 for i, r in enumerate(rows)],
                           [number(r.get(column)) for r in rows], "-"))
        return series

    missing = [n for n, r in zip(c.names, c.runs) if not r.history]
    figs = [plots.line_chart(curve(f"val_{c.metric}"), f"val {c.metric}", c.metric, width=4.8, height=3.4),
            plots.line_chart(curve("val_loss"), "val loss", "loss", width=4.8, height=3.4)]
    note = f'<p class="note">No history.csv (no curves): {esc(", ".join(missing))}.</p>' if missing else ""
    sections = [Section("table", "Runs", table(c.header, c.rows, _digits(c))),
                Section("curves", "Learning curves", '<div class="figs">' + "".join(figs) + "</div>" + note)]
    text = render(f"finetunekit compare: {len(c.runs)} runs", c.runs[0].task or "", sections)
    out.write_text(text, encoding="utf-8")
    return out


def compare(paths: list[str | Path], out: str | Path | None = None) -> tuple[str, Path]:
    """(the printed table, the page's path): one-line UserErrors for a path that is not a run, runs of different
    tasks, or an --out whose folder does not exist."""
    target = Path(out) if out is not None else Path(COMPARE)
    if not target.parent.is_dir():
        raise UserError(f"--out {target}: its folder {target.parent} does not exist")
    if target.is_dir():
        raise UserError(f"--out {target}: a folder; expected an HTML file name")
    c = collect(paths)
    return text_table(c), write_html(c, target)
