"""`finetunekit search`: the worker loop. Each trial is a normal `fit` run in STUDY/trials/NNNN, built from the
base recipe with the trial's parameters, with a TrialReport add-on that reports each epoch's validation metric
to optuna and stops the run when the pruner says so (the run then finishes cleanly: its best model saved, its
metrics.json written, marked `search.pruned_after_epoch`).

Several workers may run the same command against one storage and study name: each samples, trains and tells its
own trials (optuna's load_if_exists); all stop once the study holds --trials finished (complete or pruned) trials
and none is queued. Under `accelerate launch` rank 0 alone talks to the storage and the other ranks train the
trial it sends them (ranks.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Recipe
from ..errors import TrainingStopped, UserError
from . import ranks, storage as storages
from .check import MARKER
from .space import Param

log = logging.getLogger("finetunekit")

IGNORED = ("out", "overwrite", "resume", "resume_force", "quiet")  # recipe keys that may differ between workers


@dataclass
class Options:
    out: Path
    trials: int = 20
    timeout: float | None = None
    pruner: str = "median"
    storage: str | None = None
    study_name: str | None = None
    heartbeat: int = 30

    @property
    def name(self) -> str:
        return self.study_name or self.out.resolve().name


def monitor_of(recipe: Recipe) -> str:
    """The validation metric a trial is scored by: --metric, or the task's default (build.hyperparameters')."""
    if recipe.train.metric != "auto":
        return recipe.train.metric
    from ..tasks import TASKS

    return TASKS[recipe.task].default_monitor


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def _pruner(name: str, trials: int, epochs: int | None = None):
    """median: a trial stops after an epoch whose best value so far is worse than the median of the earlier
    trials' at that epoch, once min(5, trials / 4) trials (at least 1) have finished; halving: successive halving
    (optuna's defaults: rungs at 1, 4, 16... epochs, the top quarter goes on); hyperband: several successive-halving
    brackets from 1 epoch to the run's epochs, reduction factor 3 (optuna's HyperbandPruner)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, trials // 4)), n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs or "auto", reduction_factor=3)
    return optuna.pruners.SuccessiveHalvingPruner() if name == "halving" else optuna.pruners.NopPruner()


def base_options(recipe: Recipe) -> dict[str, Any]:
    """The recipe's options that make a study what it is (a second worker must bring the same ones)."""
    d = json.loads(json.dumps(recipe.model_dump(mode="json"), default=str))
    for key in IGNORED:
        d.pop(key, None)
    return d


def open_study(recipe: Recipe, space: list[Param], opts: Options):
    """Create the study, or join it (another worker, a second run of the command): the same recipe and space."""
    import optuna

    from ..tasks import LOWER_IS_BETTER

    monitor = monitor_of(recipe)
    direction = "minimize" if monitor in LOWER_IS_BETTER else "maximize"
    store = storages.open_storage(opts.storage, opts.out, opts.heartbeat)
    created = True
    seed = recipe.train.seed
    pruner = _pruner(opts.pruner, opts.trials, recipe.train.epochs)
    try:
        study = optuna.create_study(storage=store, study_name=opts.name, direction=direction,
                                    sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        created = False
        # a second worker: its own random stream, or it would sample the first worker's startup trials again
        study = optuna.load_study(storage=store, study_name=opts.name, pruner=pruner,
                                  sampler=optuna.samplers.TPESampler(seed=(seed * 1_000_003 + os.getpid()) % 2**32))
    mine = {"recipe": base_options(recipe), "space": {p.key: p.describe() for p in space}, "monitor": monitor}
    if created:
        for k in ("space", "monitor", "recipe"):  # "recipe" last: a joining worker waits for it
            study.set_user_attr(k, mine[k])
    else:
        _check_same(study, mine, direction, opts)
    return study, monitor


def _check_same(study, mine: dict, direction: str, opts: Options) -> None:
    theirs = study.user_attrs
    for _ in range(50):  # a worker started at the same moment may not have written them yet
        if "recipe" in theirs:
            break
        time.sleep(0.2)
        theirs = study.user_attrs
    else:
        for k, v in mine.items():
            study.set_user_attr(k, v)
        return
    where = f"--study-name {opts.name}"
    if study.direction.name.lower() != direction:
        raise UserError(f"{where}: the study {direction[:-1]}s nothing like this one (it {study.direction.name.lower()}s)")
    for what in ("monitor", "space"):
        if theirs.get(what) != mine[what]:
            raise UserError(f"{where}: the study was created with another {what} ({theirs.get(what)}); use another "
                            f"--study-name or --out")
    if theirs.get("recipe") != mine["recipe"]:
        from ..config import flatten

        a, b = flatten(theirs.get("recipe") or {}), flatten(mine["recipe"])
        key = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?")
        raise UserError(f"{where}: the study was created with another recipe ({key}: {a.get(key)!r} there, "
                        f"{b.get(key)!r} here); use the same options, or another --study-name or --out")


def run_trial(recipe: Recipe, number: int, params: dict[str, Any], trial, monitor: str, out: Path):
    """One trial's fit run (on every rank); `trial` is optuna's on rank 0, None elsewhere."""
    from ..run import as_recipe, fit
    from .trial_addon import TrialReport

    trial_recipe = as_recipe(recipe, {**params, "out": str(trial_dir(out, number)), "overwrite": False,
                                      "resume": None})
    report = TrialReport(trial, monitor)
    started = time.perf_counter()
    result = fit(trial_recipe, addons=[report])
    return result, report, time.perf_counter() - started


def search(recipe: Recipe, space: list[Param], opts: Options) -> dict | None:
    """Run trials until the study holds `opts.trials` finished ones (or `opts.timeout` passes). Rank 0 returns the
    report (report.py); other ranks None."""
    if not ranks.is_main():
        _follow(recipe, opts)
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happened
    opts.out.mkdir(parents=True, exist_ok=True)
    marker = opts.out / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"study_name": opts.name, "storage": opts.storage or storages.JOURNAL},
                                     indent=1) + "\n", encoding="utf-8")
    study, monitor = open_study(recipe, space, opts)
    log.info("search: study %r in %s, %d parameters, %d trials, pruner %s, %s val %s; storage %s%s", opts.name,
             opts.out, len(space), opts.trials, opts.pruner, "minimize" if study.direction.name == "MINIMIZE"
             else "maximize", monitor, opts.storage or opts.out / storages.JOURNAL,
             f" (heartbeat every {opts.heartbeat}s)" if storages.has_heartbeat(study._storage) else "")
    storages.reap_dead(study)
    own = {"run": 0}

    def objective(trial) -> float:
        storages.mark_worker(trial)
        params = {p.key: p.suggest(trial) for p in space}
        ranks.share((trial.number, params))
        retried = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        log.info("search: trial %d%s: %s", trial.number, f" (a retry of trial {retried})" if retried is not None else "",
                 ", ".join(f"{k} {_fmt(v)}" for k, v in params.items()))
        own["run"] += 1
        try:
            result, report, seconds = run_trial(recipe, trial.number, params, trial, monitor, opts.out)
        except TrainingStopped as e:
            if e.exit_code >= 128:  # SIGTERM/SIGINT after a checkpoint: the search stops too (the trial: FAIL)
                raise _Signalled(e) from None
            log.warning("search: trial %d failed: %s", trial.number, e)
            raise  # non-finite losses and the like: this trial fails, the search goes on
        except UserError as e:  # a combination of values the recipe refuses: this trial fails, the search goes on
            log.warning("search: trial %d failed: %s", trial.number, e)
            raise
        value = float(result.metrics["val"][monitor])
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("epochs_run", result.metrics.get("epochs_run"))
        trial.set_user_attr("seconds", round(seconds, 1))
        if report.pruned_at is not None:
            log.info("search: trial %d pruned after epoch %d in %.0fs (best val %s %.4f)", trial.number,
                     report.pruned_at, seconds, monitor, value)
            raise optuna.TrialPruned()
        log.info("search: trial %d done in %.0fs: val %s %.4f", trial.number, seconds, monitor, value)
        return value

    def enough(study, trial) -> None:
        storages.reap_dead(study)
        if _done(study, opts.trials) or own["run"] >= 2 * opts.trials:
            study.stop()

    try:
        if not _done(study, opts.trials):
            study.optimize(objective, n_trials=None, timeout=opts.timeout, callbacks=[enough], catch=(UserError,),
                           gc_after_trial=True)
    except _Signalled as e:
        raise e.args[0] from None
    finally:
        ranks.share(None)  # the other ranks stop waiting for a trial
    from .report import write_report

    return write_report(study, recipe, space, monitor, opts.out)


class _Signalled(Exception):
    """A trial stopped by a signal: not a UserError, so optuna does not catch it and the search ends."""


def _done(study, trials: int) -> bool:
    from optuna.trial import TrialState as S

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return sum(s in (S.COMPLETE, S.PRUNED) for s in states) >= trials and S.WAITING not in states


def _follow(recipe: Recipe, opts: Options) -> None:
    """Ranks other than 0: train each trial rank 0 sends, until it sends None."""
    monitor = monitor_of(recipe)
    while (message := ranks.share(None)) is not None:
        number, params = message
        try:
            run_trial(recipe, number, params, None, monitor, opts.out)
        except UserError as e:  # rank 0 fails the same trial and goes on to the next
            log.warning("search: trial %d failed on this rank: %s", number, e)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
