"""The run directory's files to watch while a run goes on: history.csv rewritten after every epoch, and
progress.json, the provisional counterpart of metrics.json (written at the end, as before):

    {"status": "running", "epoch": 3, "epochs": 10, "monitor": "accuracy", "best_epoch": 2,
     "best": {"accuracy": 0.91, "loss": 0.31, ...}, "last": {<history.csv's last row>},
     "elapsed_seconds": 84.2, "updated": "2026-12-07T05:04:39"}

status: running, then done (metrics.json is written), failed (with "error", its first line) or stopped (a
signal: the last checkpoint resumes it). Both files are replaced whole (a reader never sees half a file), by
process 0 alone.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from .artifacts import write_history, write_json

PROGRESS = "progress.json"
HISTORY = "history.csv"


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunFiles:
    """A run's history.csv and progress.json. The final status goes only into a progress.json this run owns: one it
    wrote (an epoch ended), or the one of the run it resumes. A new run that fails before its first epoch leaves
    the folder's files alone (an --overwrite that fails puts the old run back as it was: rundir.py)."""

    def __init__(self, out: Path, resumed: bool):
        self.out, self.owned = out, resumed

    def epoch(self, state, epochs: int, monitor: str, started: float) -> None:
        write_epoch(self.out, state, epochs, monitor, started)
        self.owned = True

    def mark(self, status: str, error: str | None = None) -> None:
        if self.owned:
            mark(self.out, status, error)


def write_epoch(out: Path, state, epochs: int, monitor: str, started: float) -> None:
    """After an epoch: history.csv with every epoch so far, and progress.json (status running)."""
    write_history(out / HISTORY, state.history)
    write_json(out / PROGRESS, {
        "status": "running", "epoch": state.epoch, "epochs": epochs, "monitor": monitor,
        "best_epoch": state.best_epoch if state.best_epoch > 0 else None, "best": _scalars(state.best_val),
        "last": state.history[-1] if state.history else None,
        "elapsed_seconds": round(time.perf_counter() - started, 1),
        "updated": datetime.now().isoformat(timespec="seconds")})


def mark(out: Path, status: str, error: str | None = None) -> None:
    """progress.json's status at the end of the run (done, failed, stopped); nothing when it was never written."""
    path = out / PROGRESS
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    progress.update(status=status, updated=datetime.now().isoformat(timespec="seconds"))
    if error:
        progress["error"] = error
    write_json(path, progress)
