"""The report page of a run: its sections, in order, rendered into one file.

SECTIONS is the registry: each entry is a module-level function `section(RunFiles) -> Section | None`
(None: not for this task kind; `Section.note(...)`: omitted, with the one-line reason). A new section is a
module here and one line below. The inputs and their contract: run_files.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from . import calibration, confused, confusion, curves, detection, overview, per_class, regression, top_losses
from .page import Section, render
from .run_files import RunFiles, check_run

log = logging.getLogger("finetunekit")
REPORT = "report.html"  # in the run directory

SECTIONS: dict[str, Callable[[RunFiles], Section | None]] = {
    "overview": overview.section,
    "curves": curves.section,
    "confusion": confusion.section,
    "per-class": per_class.section,
    "confused": confused.section,
    "per-class-ap": detection.ap_section,
    "regression": regression.section,
    "top-losses": top_losses.section,
    "montage": detection.montage_section,
    "calibration": calibration.section,
}


def build(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN/report.html); returns its path. A one-line
    UserError when `run_dir` is not a run directory; a section that fails is a note, never an exception."""
    run = RunFiles(check_run(run_dir))
    sections = []
    for name, make in SECTIONS.items():
        try:
            s = make(run)
        except Exception as e:  # noqa: BLE001 - one section's failure omits that section only
            log.warning("warning: report: the %s section failed (%s: %s); omitted", name, type(e).__name__, e)
            s = Section.note(name, name.replace("-", " ").capitalize(), f"could not be drawn ({type(e).__name__}: {e})")
        if s is not None:
            sections.append(s)
    m = run.metrics or {}
    subtitle = " · ".join(str(x) for x in (run.task, m.get("model"), m.get("strategy")) if x)
    target = Path(out) if out is not None else run.path / REPORT
    text = render(f"finetunekit report: {run.path.resolve().name}", subtitle, sections)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target
