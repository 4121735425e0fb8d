"""What a report reads from a run directory, each file read leniently: a missing or unreadable file is
`None` plus a one-line reason in `RunFiles.missing`, never an exception (the report then omits the
sections that need it, with that line).

    metrics.json                    scores, per-class figures, confusion matrix, calibration, run facts
    history.csv                     one row per epoch
    recipe.yaml                     the resolved recipe
    split.json                      classes, where the splits came from
    val_predictions.csv /           one row per sample (the contract in docs/report.md): item, label, prediction,
    test_predictions.csv            score, score_uncalibrated, loss, p_CLASS ... (detection: boxes)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..rundir import is_run

KINDS = {"classification", "multilabel", "regression", "detection"}


def task_kind(task: str | None) -> str | None:
    """image-classification -> classification, text-multilabel -> multilabel, detection -> detection."""
    if not task:
        return None
    kind = task.split("-", 1)[-1]
    return kind if kind in KINDS else None


def number(value: Any) -> float | None:
    """A finite float from a CSV cell or JSON value, else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def check_run(path: str | Path, what: str = "RUN") -> Path:
    """`path` as a run directory, or a one-line UserError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} {path}: no such folder (expected a finetunekit run directory)")
    if not (is_run(path) or (path / "metrics.json").is_file() or (path / "history.csv").is_file()):
        raise UserError(f"{what} {path}: not a finetunekit run directory (no metrics.json, history.csv or run marker)")
    return path


@dataclass
class RunFiles:
    path: Path
    missing: dict[str, str] = field(default_factory=dict)  # file name -> why it is not there
    _predictions: dict[str, Any] = field(default_factory=dict, repr=False)

    def _read(self, name: str, parse) -> Any:
        p = self.path / name
        if not p.is_file():
            self.missing[name] = f"{name} is not in the run directory"
            return None
        try:
            return parse(p)
        except Exception as e:  # noqa: BLE001 - a damaged file omits its sections, it never stops the report
            self.missing[name] = f"{name} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            return None

    @cached_property
    def metrics(self) -> dict | None:
        return self._read("metrics.json", lambda p: json.loads(p.read_text(encoding="utf-8")))

    @cached_property
    def history(self) -> list[dict[str, str]] | None:
        rows = self._read("history.csv", _csv_rows)
        return rows or None

    @cached_property
    def recipe_text(self) -> str | None:
        return self._read("recipe.yaml", lambda p: p.read_text(encoding="utf-8"))

    @cached_property
    def recipe(self) -> dict:
        if self.recipe_text is None:
            return {}
        try:
            loaded = yaml.safe_load(self.recipe_text)
        except yaml.YAMLError:
            return {}
        return loaded if isinstance(loaded, dict) else {}

    @cached_property
    def split(self) -> dict | None:
        return self._read("split.json", lambda p: json.loads(p.read_text(encoding="utf-8")))

    def predictions(self, split: str) -> list[dict[str, str]] | None:
        """The rows of {split}_predictions.csv (val or test), or None."""
        if split not in self._predictions:
            self._predictions[split] = self._read(f"{split}_predictions.csv", _csv_rows) or None
        return self._predictions[split]

    @property
    def task(self) -> str | None:
        return (self.metrics or {}).get("task") or self.recipe.get("task") or \
            ("image-classification" if self.metrics or self.recipe else None)

    @property
    def kind(self) -> str | None:
        return task_kind(self.task)

    @property
    def modality(self) -> str:
        return "text" if (self.task or "").startswith("text-") else "image"

    @property
    def classes(self) -> list[str]:
        return list((self.metrics or {}).get("classes") or (self.split or {}).get("classes") or [])

    def scores(self, split: str) -> dict | None:
        """metrics.json's `val` or `test` dict."""
        s = (self.metrics or {}).get(split)
        return s if isinstance(s, dict) else None

    @property
    def splits(self) -> list[str]:
        """The evaluated splits, val first."""
        return [s for s in ("val", "test") if self.scores(s) is not None or
                (self.path / f"{s}_predictions.csv").is_file()]

    def note(self, name: str) -> str:
        return self.missing.get(name) or f"{name} is not in the run directory"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# each task kind's headline metrics (tasks/*.py `headline`, here without importing torch)
HEADLINE = {"classification": ("accuracy", "macro_f1"), "multilabel": ("micro_f1", "macro_f1", "map"),
            "regression": ("mae", "rmse", "r2", "spearman"), "detection": ("map50", "map")}
