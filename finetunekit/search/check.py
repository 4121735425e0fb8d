"""`finetunekit search`'s checks before any work (torch-free): the recipe as `fit` checks it, the space file,
the study folder, the storage URL and the search's own options. One line each, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Recipe
from ..errors import UserError
from ..preflight import preflight
from ..rundir import is_run
from .space import load_space

MARKER = ".finetunekit-study.json"  # (study.py writes it)
PRUNERS = ("median", "halving", "hyperband", "none")


def check(recipe: Recipe, space_path: str, *, trials: int, timeout: float | None, pruner: str,
          storage: str | None, study_name: str | None, heartbeat: int):
    from datetime import datetime

    from .storage import check_url
    from .study import Options

    if recipe.resume:
        raise UserError("--resume: not for a search; run the same command again to continue the study in --out")
    if recipe.overwrite:
        raise UserError("--overwrite: a study folder is never replaced; run the same command to continue the study "
                        "in --out, or choose another --out")
    if trials < 1:
        raise UserError(f"--trials: expected a value >= 1, got {trials}")
    if heartbeat < 1:
        raise UserError(f"--heartbeat: expected a value >= 1, got {heartbeat}")
    if pruner not in PRUNERS:
        from ..errors import did_you_mean

        raise UserError(f"--pruner {pruner}: expected one of {', '.join(PRUNERS)}{did_you_mean(pruner, PRUNERS)}")
    check_url(storage)
    space = load_space(space_path, recipe.model_dump(mode="json"))
    preflight(recipe)
    out = recipe.out or Path("runs") / f"search-{datetime.now():%Y%m%d-%H%M%S}"
    check_study_folder(out, recipe, space_path)
    return Options(out=out, trials=trials, timeout=timeout, pruner=pruner, storage=storage, study_name=study_name,
                   heartbeat=heartbeat), space


def check_study_folder(out: Path, recipe: Recipe, space_path: str) -> None:
    """--out is a new folder or a study folder (the search continues or joins its study); never a run or a user's
    folder, and never one that holds the inputs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    d = recipe.data
    for flag, path in (("--data", d.path), ("--val", d.val), ("--test", d.test), ("--config", recipe.config_path),
                       ("--space", space_path)):
        if path is not None and (out.resolve() == Path(path).resolve() or out.resolve() in Path(path).resolve().parents):
            raise UserError(f"--out {out}: holds {flag} {path}; a search must not write where its inputs are")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        what = "a finetunekit run, not a study folder" if is_run(out) else "files that finetunekit did not write"
        raise UserError(f"--out {out}: holds {what}; choose another --out")
    if (out / MARKER).is_file():
        try:
            json.loads((out / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"--out {out}: its {MARKER} is unreadable; choose another --out") from None


