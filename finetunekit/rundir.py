"""The run directory: what marks a folder as a finetunekit run, and replacing one without losing anything.

A run is marked by `.finetunekit-run.json` (its run id), written when the run claims the folder: after the
data and the model have been checked, before the first file of the run. Nothing else counts as a run, so a
user's own folder that happens to hold a `recipe.yaml` is never taken for one. (Runs written before the
marker existed are recognised by the set of files only finetunekit writes together: recipe.yaml, split.json,
and checkpoints/ or model/.)

`--overwrite` replaces only what a run wrote (OWNED): those entries are moved aside into a hidden
`.replaced-<id>/` folder, and deleted once the new run has a checkpoint of its own. A run that fails before
its first checkpoint puts the folder back exactly as it was: the old run's files return, the new run's are
removed, and a folder the run created is removed again. Anything else in the folder (the user's notes,
predictions) stays where it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import UserError

log = logging.getLogger("finetunekit")

MARKER = ".finetunekit-run.json"
REPLACED_PREFIX = ".replaced-"
# every top-level entry a fit writes into its run directory
OWNED = (MARKER, "recipe.yaml", "split.json", "log.txt", "metrics.json", "progress.json", "history.csv", "steps.csv",
         "report.html", "model", "model.partial", "model.old", "checkpoints", "tensorboard", "val_predictions.csv",
         "test_predictions.csv")


MODEL_DIR, CONFIG = "model", "config.json"  # a run's model folder, and the file that makes a folder one


def model_folder(path: Path) -> Path | None:
    """The model folder of a run directory or a model folder (its config.json there, or in model/), else None."""
    path = Path(path)
    for folder in (path, path / MODEL_DIR):
        if (folder / CONFIG).is_file():  # a missing model.safetensors is the loader's one line
            return folder
    return None


def find_model_folder(path: Path) -> Path:
    """The model folder of a run directory or a model folder (a one-line UserError when it is neither)."""
    folder = model_folder(path)
    if folder is None:
        raise UserError(f"{path}: not a finetunekit run or model folder (no {MODEL_DIR}/{CONFIG})")
    return folder


def is_run(path: Path) -> bool:
    """Whether `path` holds a finetunekit run (its marker, or the files of a run from before the marker)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    return ((path / "recipe.yaml").is_file() and (path / "split.json").is_file()
            and ((path / "checkpoints").is_dir() or (path / "model").is_dir()))


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_out(out: Path, *, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """Refuse an --out that cannot or must not be written, before anything is read or changed.

    `inputs`: the user's files by flag (--data, --val, --test, --config, --weights...): an --out that holds
    one of them is refused, since a run writes beside them and --overwrite would replace the folder's run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    for flag, path in inputs.items():
        if path is not None and _inside(Path(path), out):
            raise UserError(f"--out {out}: holds {flag} {path}; a run must not write where its inputs are: "
                            f"choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not is_run(out):
            raise UserError(f"--out {out}: holds files that finetunekit did not write; choose another --out "
                            f"(--overwrite replaces finetunekit runs only)")
        if not overwrite:
            raise UserError(f"--out {out}: already holds a finetunekit run; choose another --out, continue it "
                            f"with --resume {out}, or replace it with --overwrite")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there ({existing} is not a writable folder)")


class RunDir:
    """The folder of one new run: `claim` it (moving a replaced run aside), then `finish` or `abort`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.run_id = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.created: Path | None = None  # the topmost folder this run created, removed again on abort
        self.replaced: Path | None = None  # the old run's entries, moved aside

    def claim(self) -> None:
        """Make the folder this run's: create it, move a previous run's entries aside, write the marker."""
        top = self.path
        while not top.parent.exists():
            top = top.parent
        if not self.path.exists():
            self.created = top
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if is_run(self.path):
                self._move_aside()
            (self.path / MARKER).write_text(json.dumps({
                "run_id": self.run_id, "finetunekit": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1) + "\n",
                encoding="utf-8")
        except OSError as e:
            self.abort()
            raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e})") from None

    def _move_aside(self) -> None:
        for stale in self.path.glob(REPLACED_PREFIX + "*"):  # a replacement that never finished: replaced now
            shutil.rmtree(stale)
        self.replaced = self.path / f"{REPLACED_PREFIX}{self.run_id}"
        self.replaced.mkdir()
        for name in OWNED:
            if (self.path / name).exists():
                os.replace(self.path / name, self.replaced / name)
        kept = sorted(p.name for p in self.path.iterdir() if p != self.replaced)
        log.info("--overwrite: replacing the run in %s%s", self.path,
                 f" (kept {len(kept)} files finetunekit did not write: {', '.join(kept[:5])}"
                 f"{', ...' if len(kept) > 5 else ''})" if kept else "")

    def finish(self) -> None:
        """The new run has a checkpoint (or is done): the run it replaced can go."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def abort(self) -> None:
        """The run failed before its first checkpoint: put the folder back exactly as it was."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        if not self.path.is_dir():
            return
        for name in OWNED:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()
        if self.replaced is not None:
            for entry in self.replaced.iterdir():
                os.replace(entry, self.path / entry.name)
            self.replaced.rmdir()
            self.replaced = None
