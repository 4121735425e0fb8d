"""Experiment trackers (`--log-with tensorboard,mlflow,wandb`): accelerate's trackers, each told the run's
resolved recipe as parameters (dotted names: `train.lr`, `data.image_size`) and, after each epoch, its
history.csv row as metrics at step = the epoch (loop.py's `accelerator.log`). Under several processes only
process 0 logs: accelerate's trackers run their start, configuration and log on the main process alone.

    tensorboard   RUN/tensorboard/ (the default)
    mlflow        MLflow's tracking store: MLFLOW_TRACKING_URI (MLflow's default: sqlite:///mlflow.db in the
                  current directory); the experiment MLFLOW_EXPERIMENT_NAME (default: finetunekit); the MLflow
                  run is named after the run directory and tagged with its path
    wandb         W&B project WANDB_PROJECT (default: finetunekit), the run named after the run directory;
                  WANDB_MODE=offline writes it under WANDB_DIR for a later `wandb sync`

This module is torch-free until `trackers` is called: preflight checks that each package is installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .config import Recipe, flatten
from .errors import UserError

# --log-with name -> (the module it imports, the pip extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", None), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
PROJECT = "finetunekit"


def check(names: list[str]) -> None:
    """A one-line error for a tracker whose package is missing, naming the pip extra."""
    for name in names:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            how = f"pip install 'finetunekit[{extra}]'" if extra else f"pip install {module}"
            raise UserError(f"--log-with {name}: the {module} package is not installed ({how})")


def params(recipe: Recipe) -> dict[str, Any]:
    """The recipe as tracker parameters: every option under its dotted name (None stays None: TensorBoard skips
    it, MLflow writes 'None')."""
    return flatten(recipe.model_dump(mode="json"))


def trackers(names: list[str], out: Path) -> list:
    """accelerate tracker objects for `names` (started by `accelerator.init_trackers`, on process 0 only)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    made = []
    for name in names:
        if name == "tensorboard":
            made.append(TensorBoardTracker("tensorboard", out))
        elif name == "mlflow":
            made.append(MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT,
                                      run_name=out.name, tags={"finetunekit.run_dir": str(Path(out).resolve())}))
        elif name == "wandb":
            made.append(WandBTracker(os.environ.get("WANDB_PROJECT") or PROJECT, name=out.name))
    return made
