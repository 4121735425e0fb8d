"""`report.html`: one self-contained page about a run (docs/report.md), written at the end of every `fit`
(process 0, after metrics.json) and by `finetunekit report RUN`; `finetunekit compare RUN...` (compare.py).

The page's sections are builder.SECTIONS; what they read, and how leniently, is run_files.py. matplotlib is
imported only when a report is built."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("finetunekit")


def build(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` (default: RUN/report.html); returns its path (builder.build)."""
    from .builder import build as build_page

    return build_page(run_dir, out)


def write_after_fit(run_dir: Path) -> Path | None:
    """fit's last step: the report, its time and size in the log; a failure is a warning, never the run's.
    FINETUNEKIT_REPORT=0 in the environment skips it (a test suite, a sweep of many small runs)."""
    if os.environ.get("FINETUNEKIT_REPORT", "1") == "0":
        log.debug("report.html not written: FINETUNEKIT_REPORT=0")
        return None
    started = time.perf_counter()
    try:
        path = build(run_dir)
    except Exception as e:  # noqa: BLE001 - the run is done and saved; its report is a convenience
        if isinstance(e, ModuleNotFoundError) and e.name == "matplotlib":
            log.warning("warning: report.html not written: matplotlib is not installed (pip install "
                        "'finetunekit[report]', then `finetunekit report %s`)", run_dir)
            return None
        log.warning("warning: report.html not written (%s: %s); write it later with `finetunekit report %s`",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "", run_dir)
        return None
    log.info("report: %s (%.1fs, %.0f KB)", path, time.perf_counter() - started, path.stat().st_size / 1024)
    return path
