"""Resuming a run: finding its checkpoint, the drift guard, restoring every piece of state.

`resume_recipe` turns `--resume RUN|auto` into the interrupted run's recipe (with the options given now on
top) and the checkpoint to continue from; `restore` loads that checkpoint into the rebuilt run's objects
after refusing, or with --resume-force naming, whatever changed since.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .config import Recipe, build_recipe, flatten, read_yaml
from .errors import UserError
from .fastpath import match_param_layout
from .loop import TrainState
from .optim import PlateauSchedule
from .rundir import MARKER, is_run

log = logging.getLogger("finetunekit")

RECIPE = "recipe.yaml"  # the run's resolved recipe: what --resume continues


@dataclass
class Resume:
    checkpoint: Path
    changed: list[str]  # recipe keys that differ from the interrupted run's ("train.batch_size: 32 -> 64")
    skipped: list[tuple[Path, str]]  # newer checkpoints that were damaged


_RUN_KEYS = {"out", "overwrite", "resume", "resume_force", "quiet"}


def resume_recipe(recipe: Recipe) -> tuple[Recipe, Resume | None]:
    """The interrupted run's recipe with the options given now on top, and its latest complete checkpoint.
    `--resume auto` with no checkpoint at --out is a new run."""
    auto = recipe.resume == "auto"
    if auto and recipe.out is None:
        raise UserError("--resume auto: needs --out, the run to continue (or to start)")
    run = Path(recipe.out if auto else recipe.resume)
    if not auto and recipe.out is not None and Path(recipe.out).resolve() != run.resolve():
        raise UserError(f"--out {recipe.out}: differs from --resume {run}; a resumed run continues in its own "
                        f"directory")
    if not is_run(run):
        if auto:
            return recipe.model_copy(update={"resume": None}), None
        raise UserError(f"--resume {run}: not a finetunekit run directory (no {MARKER})")
    found = checkpoint.latest(run)
    if found is None:
        if auto and not (run / checkpoint.CHECKPOINTS).exists():
            return recipe.model_copy(update={"resume": None}), None  # refused later unless --overwrite
        raise UserError(f"--resume {run}: no complete checkpoint in {run / checkpoint.CHECKPOINTS}")
    # recipe.yaml's paths are absolute; a run written before they were holds paths relative to where it ran
    saved = build_recipe(read_yaml(run / RECIPE), {}, source=str(run / RECIPE))
    given = {k: v for k, v in recipe.model_dump(mode="json", exclude_unset=True).items() if k not in _RUN_KEYS}
    merged = build_recipe(saved.model_dump(mode="json"), given) if given else saved
    before, after = flatten(saved.model_dump(mode="json")), flatten(merged.model_dump(mode="json"))
    changed = [f"{k}: {before.get(k)} -> {after.get(k)}" for k in sorted(after)
               if k.split(".")[0] not in _RUN_KEYS and before.get(k) != after.get(k)]
    quiet = recipe.quiet if "quiet" in recipe.model_fields_set else saved.quiet  # --quiet, or as the run was
    merged = merged.model_copy(update={"out": run, "resume": None, "resume_force": recipe.resume_force,
                                       "quiet": quiet, "overwrite": False})
    return merged, Resume(found.path, changed, found.skipped)


def restore(resume: Resume, run: Path, force: bool, model, optimizer, scheduler, checkpoints, accelerator):
    """Load a checkpoint into the run's objects after the drift guard; returns the TrainState to continue
    from and the RNG states to restore just before training."""
    for path, why in resume.skipped:
        log.warning("checkpoint %s: %s; falling back to an older one", path, why)
    tensors, meta = checkpoint.read(resume.checkpoint)
    old, new = meta["fingerprint"], checkpoints.fingerprint
    # "pruned": the digest of the --prune sizes (absent when not pruned); "peft": of the --peft method and targets
    hard = [f"{k} {old.get(k)} -> {new.get(k)}" for k in ("model", "classes", "pruned", "peft")
            if old.get(k) != new.get(k)]
    if hard:
        raise UserError(f"--resume {run}: cannot continue: {'; '.join(hard)} (the saved weights do not fit); "
                        f"start a new run")
    moved = [k for k in ("data", "batch_size", "grad_accum", "processes") if old.get(k) != new[k]]
    changes = [("the training data's content (SHA-256)" if k == "data" else f"{k} {old.get(k)} -> {new[k]}")
               for k in moved]
    changes += [c for c in resume.changed if not c.startswith(("train.batch_size", "train.grad_accum"))]
    if old.get("teacher") != new.get("teacher") and "train.teacher" not in " ".join(resume.changed):
        changes.append("the teacher's weights (SHA-256)")  # --teacher: the same folder, trained again since
    if old.get("target_data") != new.get("target_data") and "data.target_data" not in " ".join(resume.changed):
        changes.append("the target-domain images' content (SHA-256)")  # --target-data: the same folder, edited
    state = TrainState.from_dict(meta["train"])
    if changes:
        if not force:
            raise UserError(f"--resume {run}: the run changed since its checkpoint: {'; '.join(changes)}; pass "
                            f"--resume-force to continue anyway, or start a new run")
        log.warning("--resume-force: continuing although %s", "; ".join(changes))
        if moved and state.batch:
            log.warning("dropped: the position inside epoch %d (%d batches trained); the epoch restarts from "
                        "its first batch", state.epoch + 1, state.batch)
            state.batch = state.seen = 0
            state.loss_sum = state.running = state.epoch_seconds = 0.0
    saved = checkpoint.optimizer_state(tensors.get("optimizer.safetensors", {}), meta["optimizer"])
    if checkpoints.sharding is not None:  # --fsdp: each process keeps its shards of the whole tensors
        checkpoints.sharding.load_model(model, tensors["model.safetensors"])
        checkpoints.sharding.load_optimizer(model, optimizer, saved)
    else:
        model.load_state_dict(tensors["model.safetensors"])
        optimizer.load_state_dict(saved)
    match_param_layout(optimizer)  # channels_last weights: their moments too (fused AdamW reads flat memory)
    if isinstance(scheduler, PlateauSchedule):  # timm's schedules are functions of the update count
        scheduler.load_state_dict(meta["scheduler"])
    if meta.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    checkpoints.addon_tensors = {k: v for k, v in tensors.items() if k not in checkpoint.CORE_FILES}
    checkpoints.best_name = meta.get("best_checkpoint")
    if accelerator.is_main_process:
        checkpoint.truncate_steps(checkpoints.steps_csv, state.step)
    else:  # the epoch's running sums saved are every process's together: process 0 carries them on
        state.loss_sum = state.running = 0.0
        state.seen = 0
    log.info("resuming from %s: epoch %d, batch %d, %d updates done", resume.checkpoint, state.epoch + 1,
             state.batch, state.updates)
    return state, (tensors["rng.safetensors"], meta["rng"])


def restart_cut_epoch(state) -> None:
    """A checkpoint written in the middle of an epoch, resumed on a stream (shard data: no sampler to skip
    batches with): the epoch starts again from its first batch, its partial sums dropped; said in the log."""
    if not state.batch:
        return
    log.warning("warning: --resume: the checkpoint is %d batches into epoch %d; shard data is a stream, so the epoch "
                "starts again from its first batch (not an exact resume)", state.batch, state.epoch + 1)
    state.batch = state.seen = 0
    state.loss_sum = state.running = state.epoch_seconds = state.grad_norm_sum = state.grad_norms = 0.0
