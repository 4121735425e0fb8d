"""Ensembles: `finetunekit predict RUN_A RUN_B ... INPUT` and `finetunekit evaluate RUN_A RUN_B ... --data D`
average the members' calibrated probabilities (docs/ensembles.md).

    members(run, inputs) -> (runs, inputs)   predict's positional arguments: the leading run/model folders
    load(paths) -> Ensemble                  every member loaded, one task and one class list checked
    combine(kind, logits, temperatures)      the members' mean: softmax (classification), sigmoid (multi-label),
                                             each of logits / T; the mean prediction (regression)
    evaluate(paths, data) -> dict            each member's metrics, the ensemble's, and its gain

The mean is handed to the task's own `predict` and metrics as pseudo-logits whose softmax (sigmoid) is exactly
that mean: log p (classification), log(p / (1 - p)) (multi-label). So an ensemble's predictions have the
single model's format, and its loss is the negative log-likelihood of the averaged probabilities.
Detection is refused (boxes do not average).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .predictor import Predictor

EPS = 1e-12  # multi-label: probabilities kept inside (0, 1) before the inverse sigmoid


def is_model_dir(path: str | os.PathLike) -> bool:
    """A run directory or model folder (config.json here or in model/), not an export: what an ensemble member is."""
    from .rundir import model_folder
    from .runtime import export_format

    p = Path(path)
    return p.is_dir() and model_folder(p) is not None and export_format(p) is None


def members(run: str, inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """predict's positional arguments split: (the runs: `run` and the run or model folders that lead `inputs`, the
    rest). One run: (`[run]`, `inputs` as they were)."""
    runs, rest = [run], list(inputs)
    while rest and is_model_dir(rest[0]):
        runs.append(rest.pop(0))
    return runs, rest


def _task_name(model) -> str:
    return getattr(model, "task_name", None) or (getattr(model, "table", None) or {}).get("task") or \
        "image-classification"


def check(models: Sequence[Any], paths: Sequence[str | os.PathLike]) -> None:
    """One task and one class list (same names, same order) for every member; one line naming the one that differs."""
    first, name = models[0], _task_name(models[0])
    if first.task.kind == "detection":
        raise UserError(f"{paths[0]}: a detection model; an ensemble averages probabilities or values (classification, "
                        f"multi-label, regression), not boxes")
    for path, model in zip(paths[1:], models[1:]):
        if _task_name(model) != name:
            raise UserError(f"{path}: a {_task_name(model)} model; {paths[0]} is {name} (an ensemble's members "
                            f"share one task)")
        if list(model.classes or []) != list(first.classes or []):
            raise UserError(f"{path}: its classes ({', '.join(model.classes or [])}) are not {paths[0]}'s "
                            f"({', '.join(first.classes or [])}); an ensemble's members need the same classes in "
                            f"the same order")
        if first.task.kind == "multilabel" and model.task.threshold != first.task.threshold:
            raise UserError(f"{path}: its multi-label threshold is {model.task.threshold:g}, {paths[0]}'s "
                            f"{first.task.threshold:g}; an ensemble thresholds its mean probability once, so its "
                            f"members need the same threshold")


def combine(kind: str, logits: Sequence[Any], temperatures: Sequence[Any]):
    """The members' mean as pseudo-logits [N, C] (float32): log of the mean calibrated softmax (classification),
    inverse sigmoid of the mean calibrated sigmoid (multi-label), the mean output (regression)."""
    import torch

    from .calibration import probabilities

    if kind == "regression":
        return torch.stack([torch.as_tensor(x).double() for x in logits]).mean(0).float()
    if kind not in ("classification", "multilabel"):
        raise UserError(f"an ensemble of {kind} models: not supported")
    p = torch.stack([probabilities(kind, torch.as_tensor(x), t) for x, t in zip(logits, temperatures)]).mean(0)
    if kind == "classification":
        return p.clamp_min(1e-300).log().float()
    p = p.clamp(EPS, 1 - EPS)
    return (p.log() - (-p).log1p()).float()


def mean_probabilities(kind: str, pseudo):
    """The averaged probabilities back from `combine`'s pseudo-logits (float64)."""
    z = pseudo.double()
    return z.softmax(-1) if kind == "classification" else z.sigmoid() if kind == "multilabel" else z


class Ensemble(Predictor):
    """Several loaded models (artifacts.load) of one task and class list; `predict` as a single model's, from the
    mean of the members' calibrated probabilities. The first member's task formats the results (multi-label:
    every member has the same threshold, `check`)."""

    calibration = None  # each member's temperature is applied before averaging

    def __init__(self, models: Sequence[Any], paths: Sequence[str | os.PathLike]):
        check(models, paths)
        self.models, self.paths = list(models), [str(p) for p in paths]
        self.task = self.models[0].task

    @classmethod
    def load(cls, paths: Sequence[str | os.PathLike]) -> Ensemble:
        from .artifacts import load

        return cls([load(p) for p in paths], paths)

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    @property
    def modality(self) -> str:
        from .inference import TextModel

        return "text" if isinstance(self.models[0], TextModel) else "image"

    def to(self, device) -> Ensemble:
        for m in self.models:
            m.to(device)
        return self

    def _inputs(self, inputs: Any):
        return self.models[0]._inputs(inputs)

    def _scores(self, items: list[Any], batch_size: int, skip: bool):
        outs, failed = [], {}
        for model in self.models:  # the same items: the same ones fail to read in every member
            logits, bad = model._scores(items, batch_size, skip)
            outs.append(logits)
            failed.update(bad)
        return combine(self.task.kind, outs, [m.temperature for m in self.models]), failed

    def _check_uncertainty(self, mc_dropout: int, ood_score: str | None, scores: tuple) -> None:
        raise UserError("--uncertainty: for one model, not an ensemble (its OOD threshold and dropout passes are a "
                        "single model's)")


def evaluate(paths: Sequence[str | os.PathLike], data: str | os.PathLike, batch_size: int = 64, quiet: bool = True,
             cpu: bool = False) -> dict:
    """Each member's metrics on labelled `data` (as `finetunekit evaluate` gives one model's), the ensemble's (the
    mean of the calibrated probabilities; ece and nll of that mean for classification and multi-label), and
    `gain`: the ensemble's headline metric minus the best member's and minus the members' mean (for a
    lower-is-better metric, the other way round: positive = the ensemble is better)."""
    import torch

    from .calibration import figures
    from .run import evaluate_model
    from .tasks import LOWER_IS_BETTER

    ensemble = Ensemble.load(paths)
    task, kind = ensemble.task, ensemble.task.kind
    rows, logits, targets = [], [], None
    for path, model in zip(ensemble.paths, ensemble.models):
        metrics, z, y = evaluate_model(model, Path(data), batch_size, quiet, cpu, keep=True)
        if targets is not None and not torch.equal(y, targets):
            raise UserError(f"{path}: read other samples from {data} than {ensemble.paths[0]} did")
        targets = y
        rows.append({"run": path, **metrics})
        logits.append(z)
    pseudo = combine(kind, logits, [m.temperature for m in ensemble.models])
    scores = task.metrics()
    loss, count = task.update(scores, pseudo, targets)
    out = task.summarize(scores.compute())
    out["loss"] = float(loss) / max(count, 1)
    out["samples"] = count
    if kind in ("classification", "multilabel"):
        fig = figures(kind, pseudo, targets)  # already calibrated and averaged: no temperature
        out.update(ece=fig["ece"], nll=fig["nll"])
    out["skipped"] = rows[0]["skipped"]
    metric = task.headline[0]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    values = [r[metric] for r in rows]
    best = min(values) if sign < 0 else max(values)
    gain = {"metric": metric, "vs_best_member": sign * (out[metric] - best),
            "vs_mean_member": sign * (out[metric] - sum(values) / len(values))}
    return {"members": rows, "ensemble": out, "gain": gain}
