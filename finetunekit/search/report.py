"""What a search leaves in its study folder: the ranked table (results.csv, results.md, printed), the best
recipe (best.yaml, loadable by `finetunekit fit --config`), the parameter importances (importances.json)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

from ..config import Recipe, absolute_paths
from .space import Param


_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def ranked(study, space: list[Param]) -> list[dict[str, Any]]:
    """One row per trial: complete ones best first, then pruned ones by their last reported value, then the rest."""
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": value,
                     "epochs": t.user_attrs.get("epochs_run", len(t.intermediate_values) or None),
                     "seconds": seconds, **{p.key: t.params.get(p.key) for p in space},
                     "run": t.user_attrs.get("run_dir", ""),
                     "retry_of": t.system_attrs.get("failed_trial")})
    rows.sort(key=lambda r: (_ORDER.get(r["state"].upper(), 5), sign * r["value"] if r["value"] is not None
                             else float("inf"), r["trial"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank if r["state"] == "complete" else None
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], monitor: str) -> str:
    cols = [c for c in rows[0] if c not in ("run", "rank")] if rows else []
    head = ["rank", *[f"val {monitor}" if c == "value" else c for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([_cell(r["rank"]), *(_cell(r[c]) for c in cols)]) + " |")
    return "\n".join(lines) + "\n"


def importances(study) -> tuple[dict[str, float] | None, str]:
    """optuna's fANOVA importances over the complete trials, or None and why not."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"parameter importances need 2 or more complete trials (the study has {len(complete)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:  # e.g. every complete trial had the same parameters
        return None, f"parameter importances: {e}"
    return {k: round(float(v), 4) for k, v in imp.items()}, ""


def best_recipe(study, recipe: Recipe, monitor: str) -> Recipe | None:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    from ..run import as_recipe

    r = as_recipe(recipe, {**best.params, "out": None, "overwrite": False, "resume": None,
                           "description": f"search {study.study_name}: best of trial {best.number}, val {monitor} "
                                          f"{best.value:.4f}"})
    return r


def write_report(study, recipe: Recipe, space: list[Param], monitor: str, out: Path) -> dict:
    rows = ranked(study, space)
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["rank", *[c for c in rows[0] if c != "rank"]] if rows else ["rank"])
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    table = markdown(rows, monitor)
    (out / "results.md").write_text(table, encoding="utf-8")
    imp, why = importances(study)
    (out / "importances.json").write_text(json.dumps(imp if imp is not None else {"unavailable": why}, indent=1)
                                          + "\n", encoding="utf-8")
    best = best_recipe(study, recipe, monitor)
    if best is not None:
        (out / "best.yaml").write_text(absolute_paths(best).to_yaml(), encoding="utf-8")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"rows": rows, "table": table, "importances": imp, "importances_note": why,
            "best": out / "best.yaml" if best is not None else None, "counts": counts}
