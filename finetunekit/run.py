"""A run: `fit` and `evaluate` — the run directory, the log and the metrics — calling the build stages
(build.py), the resume machinery (resume.py) and the one training loop (loop.py) in a fixed order."""

from __future__ import annotations

import dataclasses
import logging
import re
import resource
import time
from dataclasses import dataclass
from datetime import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from safetensors import SafetensorError

from . import (build, checkpoint, datachecks, distributed, fastpath, loop, peft_methods, posthoc, pruning, runfiles,
               sharding, tracking, twostage)
from .addons import AddOn
from .artifacts import load, load_weights_file, write_history, write_json
from .config import Recipe, build_recipe
from .errors import TrainingStopped, UserError, first_line
from .evaluation import Outputs, evaluate as evaluate_loader
from .export import EXPORTERS
from .optim import build_scheduler
from .preflight import preflight
from .report import write_after_fit as write_report
from .resume import RECIPE, Resume, restart_cut_epoch, restore, resume_recipe
from .rundir import RunDir, check_out
from .runlog import RunLog
from .strategies import plural
from .teacher import folder_of
from .tasks import LOWER_IS_BETTER

log = logging.getLogger("finetunekit")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def as_recipe(recipe: Recipe | dict | str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        merged = build_recipe(recipe.model_dump(), overrides)
        merged._config_path = recipe.config_path
        return merged
    if isinstance(recipe, (str, Path)):
        return Recipe.load(recipe, overrides)
    return build_recipe(recipe or {}, overrides or {})


def default_out(spec: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.split(":")[-1])
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def fit(recipe: Recipe | dict | str | Path | None = None, *, addons: Sequence[AddOn] = (), **overrides: Any) -> RunResult:
    """Fine-tune as `recipe` says (a Recipe, a dict, or a YAML path; keyword overrides win:
    `fit("r.yaml", **{"train.epochs": 3})`). Returns the run directory and its final metrics. `addons`: add-ons
    of the caller's, after the recipe's (a search trial's pruner: finetunekit/search/trial_addon.py)."""
    recipe = as_recipe(recipe, overrides)
    resume = None
    if recipe.resume:
        recipe, resume = resume_recipe(recipe)
    preflight(recipe)
    recipe = twostage.resolve(recipe)  # --init: its --model taken
    out = recipe.out or default_out(recipe.model_name)
    run_dir = None
    main = distributed.is_main()
    if resume is None:  # a new run: nothing at --out changes until its data and model have been checked
        d = recipe.data
        check_out(out, overwrite=recipe.overwrite, inputs={
            "--data": d.path, "--val": d.val, "--test": d.test, "--config": recipe.config_path,
            "--weights": recipe.model.weights, "--init": recipe.model.init, "--synonyms": d.synonyms,
            "--target-data": d.target_data,
            "--teacher": folder_of(recipe.train.teacher) if recipe.train.teacher else None})
        run_dir = RunDir(out) if main else None  # process 0 alone writes the run directory
    files = runfiles.RunFiles(out, resumed=resume is not None) if main else None
    with RunLog(out / "log.txt" if resume is not None and main else None, recipe.quiet, main=main,
                verbose=recipe.verbose) as run_log:
        try:
            result = _train(recipe, out, resume, run_dir, run_log, files, addons)
        except BaseException as e:
            if files is not None:  # progress.json (this run's) says how the run ended
                stopped = isinstance(e, KeyboardInterrupt) or getattr(e, "exit_code", 0) >= 128
                files.mark("stopped" if stopped else "failed", first_line(e))
            if run_dir is not None:  # failed before its first checkpoint: the folder goes back as it was
                run_dir.finish() if checkpoint.latest(out) is not None else run_dir.abort()
            raise
    if run_dir is not None:
        run_dir.finish()
    return result


def _train(recipe: Recipe, out: Path, resume: Resume | None, run_dir: RunDir | None, run_log: RunLog,
           files: runfiles.RunFiles | None, extra_addons: Sequence[AddOn] = ()) -> RunResult:
    started = time.perf_counter()
    set_seed(recipe.train.seed)
    accelerator = build.accelerator(recipe.train.precision, recipe.train.grad_accum, recipe.train.cpu, out,
                                    log_with=recipe.trackers, fsdp=recipe.train.fsdp)
    gpu = accelerator.device.type == "cuda"
    distributed.check_backend(accelerator)
    recipe, inputs = build.inputs(recipe, accelerator)  # --batch-size auto fills in its numbers
    initialized = twostage.apply(recipe.model, inputs)  # --init: the earlier run's weights, before anything reads them
    accelerator = build.with_model_precision(accelerator, recipe.train, inputs.backbone.module, out, recipe.trackers)
    recipe, decided = build.playbook(recipe, inputs)  # --strategy auto, the default --epochs
    distributed.check_compile(accelerator, recipe.train.strategy, recipe.train.compile)
    t, backbone, task = recipe.train, inputs.backbone, inputs.task
    teacher = build.teacher(recipe, inputs, accelerator)  # --teacher: checked against the student's classes
    if resume is None:  # data and model are good: the run takes its folder (process 0; the others wait for it)
        accelerator.wait_for_everyone()  # every process has checked --out before any of it changes
        if run_dir is not None:
            run_dir.claim()
            run_log.attach(out / "log.txt")
        accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    log.info("finetunekit: %s, fitting %s on %s -> %s", recipe.task, inputs.model_name, recipe.data.path, out)
    for line in inputs.summary:
        log.info("%s", line)
    for line in decided:
        log.info("%s", line)
    pruned = build.prune(recipe.model, inputs)  # before the optimizer: it fine-tunes the pruned model
    if pruned:
        log.info("%s", pruned)
    adapted = build.peft(recipe.model, inputs)  # before the optimizer: it holds the adapters
    if adapted:
        log.info("%s", adapted)
    if t.class_weights and task.class_weights is not None:
        log.info("class weights: %s", ", ".join(f"{c} {float(w):g}" for c, w in zip(task.classes, task.class_weights)))

    hyper = build.hyperparameters(t, recipe.modality, task, accelerator.num_processes, peft=recipe.model.peft)
    data_hash, split_hashes, leaked = checkpoint.content_hash(inputs.sources)
    if leaked:
        log.warning("warning: %d validation images are byte-identical to training images (leakage: validation "
                    "scores will be optimistic)", leaked)
    _check_data(recipe, inputs)
    # fused AdamW: one kernel per update on GPUs; on the CPU too (4.8 vs 21.1 ms per EfficientNet-Lite0 step)
    plan, optimizer = build.plan_and_optimizer(t, backbone, hyper.lr, fused=accelerator.device.type in ("cuda", "cpu"))
    with accelerator.main_process_first():  # caches (features, decoded images, teacher logits): written once
        trained = build.fast_inputs(recipe, inputs, plan, split_hashes, accelerator.device, pin_memory=gpu,
                                    processes=accelerator.num_processes)
        trained = build.teacher_logits(recipe, inputs, trained, teacher, split_hashes, accelerator.device)
    addons = build.addons(recipe.data, t, recipe.modality, backbone, task, teacher, accelerator.num_processes,
                          workers=inputs.num_workers)
    addons.extend(extra_addons)
    module = addons.wrap_model(trained.module)
    shard_mode = distributed.shard_mode(accelerator, t.fsdp)  # --fsdp, or an accelerate config's FSDP
    if shard_mode is None and recipe.modality == "image" and fastpath.channels_last(module):
        log.debug("channels_last memory format (a CNN)")  # cuDNN's and oneDNN's fastest convolution layout
    shards = None
    if shard_mode == "fully_shard":  # CPU processes: accelerate cannot shard there, fully_shard does
        module, shards = sharding.shard(accelerator, module, optimizer, backbone.adapter.layer_groups(backbone))
    elif shard_mode == "accelerate":
        shards = sharding.for_accelerate(accelerator, module, backbone.adapter.layer_groups(backbone))
    module, optimizer, train_loader, val_loader = accelerator.prepare(module, optimizer, trained.train_loader,
                                                                      trained.val_loader)
    if shard_mode == "accelerate":
        sharding.log_share(accelerator, module, "accelerate's FSDP2 plugin")
    features = None
    if trained.features is not None:  # the staged strategy's head-only phase: the head on cached features
        head, features_train, features_val = trained.features
        features = (head, *accelerator.prepare(features_train, features_val))
    if t.compile:
        module = fastpath.compile_with_fallback(module)
        log.info("--compile: torch.compile compiles the model during the first batches")
    updates_per_epoch = -(-len(train_loader) // t.grad_accum)
    scheduler = build_scheduler(optimizer, kind=hyper.scheduler, epochs=t.epochs, updates_per_epoch=updates_per_epoch,
                                warmup_epochs=hyper.warmup, min_lr_ratio=hyper.min_lr_ratio,
                                restart_epochs=t.restart_epochs,
                                plateau_mode="min" if hyper.monitor in LOWER_IS_BETTER else "max")

    fingerprint = {"data": data_hash, "classes": task.classes, "cached_features": trained.cached,
                   "model": inputs.model_name, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                   "processes": accelerator.num_processes,
                   **({"pruned": pruning.digest(backbone.pruned_layers)} if backbone.pruned_layers else {}),
                   **({"teacher": teacher.digest} if teacher is not None else {}),
                   **({"peft": peft_methods.digest(backbone.peft)} if backbone.peft else {}),
                   **addons.fingerprint()}  # --target-data: the target images' content
    checkpoints = checkpoint.Checkpoints(out, every=t.checkpoint_every, keep=t.keep_checkpoints,
                                         fingerprint=fingerprint, scaler=accelerator.scaler,
                                         is_main=accelerator.is_main_process, sharding=shards)
    state, rng = (None, None) if resume is None else \
        restore(resume, out, recipe.resume_force, accelerator.unwrap_model(module, keep_torch_compile=False),
                optimizer, scheduler, checkpoints, accelerator)
    if state is not None and inputs.streamed:
        restart_cut_epoch(state)  # a stream cannot skip to a batch: data.shards
    resolved = build.resolved_recipe(recipe, out, hyper, inputs, trained)
    if main:
        (out / RECIPE).write_text(resolved.to_yaml(), encoding="utf-8")
        write_json(out / "split.json", inputs.split_record)
    _log_setup(recipe, inputs, hyper, module, trained.cached, accelerator, updates_per_epoch)

    model_dir = out / "model"

    def on_best(epoch: int, val: dict, weights) -> None:
        if shards is not None:  # every process takes part in gathering the whole weights; process 0 exports them
            weights = shards.gathered(weights)
        if not accelerator.is_main_process:
            return
        full = build.with_head(backbone, weights) if trained.cached else weights
        try:
            EXPORTERS["model-folder"](dataclasses.replace(backbone, module=full), task, model_dir,
                                      spec=inputs.model_name, task_name=recipe.task,
                                      extra={**inputs.extra_config, **addons.model_config()})
        except (OSError, SafetensorError) as e:  # a full disk, a file-size limit: the checkpoints are intact
            last = checkpoint.latest(out)
            raise TrainingStopped(f"cannot write the model folder {model_dir} ({getattr(e, 'strerror', None) or e}); "
                                  f"the last complete checkpoint is {last.path if last else 'none yet'}; make room "
                                  f"and continue with `finetunekit fit --resume {out}`") from None
        finally:
            if shards is not None:
                shards.release()

    accelerator.init_trackers(tracking.PROJECT, config=tracking.params(resolved))  # process 0 logs (tracking.py)
    cfg = loop.LoopConfig(epochs=t.epochs, plan=trained.plan, clip_grad=t.clip_grad, monitor=hyper.monitor,
                          patience=t.early_stopping, min_delta=t.early_stopping_delta, quiet=recipe.quiet,
                          max_nonfinite=t.max_nonfinite)
    def on_epoch(state: loop.TrainState) -> None:  # files to watch the run by (process 0's: runfiles)
        if files is not None:
            files.epoch(state, t.epochs, hyper.monitor, started)

    if rng is not None:
        checkpoint.restore_rng(*rng)  # last: nothing between here and the first batch draws a random number
    with checkpoints:
        try:
            result = loop.fit(accelerator, module, optimizer, scheduler, train_loader, val_loader, task, cfg,
                              on_best, state=state, checkpoints=checkpoints, addons=addons, features=features,
                              on_epoch=on_epoch)
        except torch.OutOfMemoryError:
            last = checkpoint.latest(out)
            raise TrainingStopped(
                f"out of {'GPU ' if gpu else ''}memory at batch size {t.batch_size}; the last complete checkpoint "
                f"is {last.path if last else 'none yet'}; continue with a smaller batch and the same effective "
                f"batch: `finetunekit fit --resume {out} --batch-size {max(1, t.batch_size // 2)} --grad-accum "
                f"{t.grad_accum * 2} --resume-force`") from None
    spread = distributed.drift(accelerator, accelerator.unwrap_model(module, keep_torch_compile=False))
    held = sharding.held(accelerator, module) if shards is not None else None  # parameters per process
    if held is not None:
        log.info("--fsdp: parameters held per process: %s of %d (sharded: no copies to compare)",
                 ", ".join(str(n) for n in held["per_process"]), held["total"])
    if spread is not None:
        (log.info if spread == 0 else log.warning)("processes in step: the largest parameter difference between "
                                                   "processes after training is %.3g", spread)
    if main:  # finished: the best model is in model/; the last checkpoint can extend the run
        write_history(out / "history.csv", result.history)
        checkpoint.prune(out / checkpoint.CHECKPOINTS, keep=1, protect=set())
    if result.best_epoch < 0:
        distributed.end_trackers(accelerator)
        raise UserError(f"training produced no finite validation {hyper.monitor}; no model was saved "
                        f"(try a lower --lr)")

    metrics: dict[str, Any] = {"val": result.best_val}  # the loop's figures of the saved weights
    # the best checkpoint exactly as saved scores validation (for the calibration and val_predictions.csv) and
    # the test set, once each (posthoc.py)
    accelerator.wait_for_everyone()
    scorer = accelerator.prepare(backbone.module) if trained.cached else module  # the whole model
    load_weights_file(accelerator.unwrap_model(scorer, keep_torch_compile=False), model_dir)
    splits = {"val": accelerator.prepare(inputs.val_loader) if trained.cached else val_loader,
              **({"test": accelerator.prepare(inputs.test_loader)} if inputs.test_loader is not None else {})}
    scored = posthoc.score_best(accelerator, addons.eval_model(scorer), splits, task, recipe.quiet)
    if "test" in scored:
        metrics["test"] = scored["test"].metrics
    if hasattr(task, "scoring_best"):  # the loop scored a subset (seq2seq's generation): the whole set's figures
        metrics["val"] = scored["val"].metrics
    metrics.update(posthoc.finish(scored, task, {"val": inputs.val_loader, "test": inputs.test_loader},
                                  out if main else None, model_dir if main else None, calibrate=t.calibration))

    def best() -> torch.nn.Module:  # the whole model with the saved best weights
        whole = accelerator.unwrap_model(accelerator.prepare(backbone.module) if trained.cached else module,
                                         keep_torch_compile=False)
        load_weights_file(whole, model_dir)
        return whole

    def score(whole: torch.nn.Module) -> dict:  # validation metrics of the whole model
        loader = accelerator.prepare(inputs.val_loader) if trained.cached else val_loader
        return evaluate_loader(accelerator, addons.eval_model(whole), loader, task, desc="val", quiet=recipe.quiet)

    metrics.update(addons.finish(best, model_dir if accelerator.is_main_process else None, score))
    distributed.end_trackers(accelerator)
    metrics.update(_run_metrics(recipe, inputs, hyper, result, accelerator, started, resume))
    metrics["unreadable_in_training"] = failed = _unreadable(inputs, trained)
    if failed:
        log.warning("warning: %d image file(s) passed the start-up check but could not be decoded during the run; "
                    "each was replaced by the next image of its split", failed)
    if spread is not None:
        metrics["processes"] = {"count": accelerator.num_processes, "max_param_difference": spread}
    if held is not None:
        metrics["processes"] = {"count": accelerator.num_processes, "sharded": f"fsdp ({shards.engine})", **held}
    if initialized is not None:
        metrics["init"] = initialized
    metrics["warnings"] = run_log.warnings  # every warning line of this run, in order
    if main:
        write_json(out / "metrics.json", metrics)
        write_report(out)  # report.html; a failure is a warning
    if files is not None:
        files.mark("done")
    final = metrics.get("test", metrics["val"])
    log.info("done in %.0fs: best epoch %d; %s %s; run: %s", metrics["wall_seconds"], result.best_epoch,
             "test" if "test" in metrics else "val", ", ".join(f"{k} {final[k]:.4f}" for k in task.headline), out)
    return RunResult(out, metrics)


def _check_data(recipe: Recipe, inputs) -> None:
    """The data's warnings (datachecks): a tiny validation set or one missing a class, test images identical to
    training images."""
    try:
        val_size = len(inputs.val_loader.dataset)
    except TypeError:  # a stream without a length
        val_size = len(inputs.val_targets)
    datachecks.check_validation(inputs.task.kind, inputs.task.classes or [], inputs.train_targets,
                                inputs.val_targets, val_size)
    if not inputs.streamed:
        datachecks.check_test_leakage(inputs.sources.get("train", []), inputs.test_paths)


def _log_setup(recipe: Recipe, inputs, hyper: build.Hyper, module, cached: bool, accelerator,
               updates_per_epoch: int) -> None:
    t, backbone = recipe.train, inputs.backbone
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # on cached features `module` is the head alone: the model's size is the whole backbone's
    total = sum(p.numel() for p in (backbone.module if cached else module).parameters())
    frozen = "; the frozen backbone ran once, its features cached" if cached else ""
    frozen += f", first {t.freeze_layers} layers frozen" if t.freeze_layers else ""
    frozen += f", frozen: {t.freeze}" if t.freeze else ""
    frozen += f", frozen types: {t.freeze_types}" if t.freeze_types else ""
    log.info("%s", distributed.startup_line(accelerator, t.batch_size, t.grad_accum))
    log.info("model: %s (%s:%s), %.2fM parameters, %.2fM trainable (%s%s); %s; device %s, precision %s",
             inputs.model_name, backbone.source, backbone.architecture, total / 1e6, trainable / 1e6, t.strategy,
             frozen, inputs.input_desc, accelerator.device, accelerator.mixed_precision)
    extras = (f", layer decay {t.layer_decay:g}" if t.layer_decay else "") + \
        (f", head lr x{t.head_lr_mult:g}" if t.head_lr_mult != 1.0 else "")
    log.info("optimizer: %s lr %.3g (effective batch %d), weight decay %g%s, warmup %s + %s decay; %s/epoch",
             t.optimizer, hyper.lr, hyper.effective_batch, t.weight_decay, extras, plural(hyper.warmup, "epoch"),
             hyper.scheduler, plural(updates_per_epoch, "update"))


def _unreadable(inputs, trained) -> int:
    """Files that failed to decode during the run (data.unreadable), over every dataset it read."""
    from .data import unreadable

    loaders = (inputs.train_loader, inputs.val_loader, inputs.test_loader, trained.train_loader, trained.val_loader)
    datasets = {id(d): d for loader in loaders if (d := getattr(loader, "dataset", None)) is not None}
    return unreadable(datasets.values())


def _peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"process": round(own, 1), "largest_worker": round(children, 1)}


def _run_metrics(recipe: Recipe, inputs, hyper: build.Hyper, result, accelerator, started: float,
                 resume: Resume | None) -> dict[str, Any]:
    """Everything metrics.json says about the run besides its scores."""
    train_rates = [r["train_samples_per_s"] for r in result.history]
    sizes = {**({"image_size": inputs.image_size} if inputs.image_size is not None else {}),
             **({"max_length": inputs.max_length} if inputs.max_length is not None else {})}
    out = dict(
        task=recipe.task, model=inputs.model_name, strategy=recipe.train.strategy, classes=inputs.task.classes,
        **sizes, best_epoch=result.best_epoch, epochs_run=len(result.history), stopped_early=result.stopped_early,
        monitor=hyper.monitor, train_seconds=round(result.train_seconds, 2),
        train_samples_per_s=round(sum(train_rates) / len(train_rates), 1),
        wall_seconds=round(time.perf_counter() - started, 2), skipped=inputs.skipped,
        peak_rss_mb=_peak_rss_mb(), device=str(accelerator.device), precision=accelerator.mixed_precision,
        skipped_updates=result.skipped, **({"resumed_from": str(resume.checkpoint)} if resume else {}),
    )
    if torch.cuda.is_available() and accelerator.device.type == "cuda":
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def evaluate(run: str | Path, data: str | Path, batch_size: int = 64, quiet: bool = True,
             cpu: bool = False) -> dict:
    """Metrics of a saved model on labelled data in the form it was trained on (image folder or manifest;
    a table with the same columns for text). Labels must be the model's. A calibrated model's also carry
    ece and nll (with its temperature), ece_uncalibrated, nll_uncalibrated and the temperature."""
    return evaluate_model(load(run), data, batch_size, quiet, cpu)[0]


def evaluate_model(model, data: str | Path, batch_size: int = 64, quiet: bool = True, cpu: bool = False,
                   keep: bool = False) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """`evaluate` of a loaded model: (its metrics, the gathered logits, the targets). The outputs are kept for a
    calibrated model (its figures need them) or when `keep` (an ensemble averages them), else (metrics, None, None)."""
    loader, skipped = model.labelled_loader(Path(data), batch_size)
    accelerator = build.accelerator("auto", 1, cpu, None, model.module)  # fit's precision for this model
    module, loader = accelerator.prepare(model.module, loader)
    kept = Outputs() if keep or model.calibration is not None else None
    metrics = evaluate_loader(accelerator, model.eval_module(module), loader, model.task, quiet=quiet, keep=kept)
    logits = targets = None
    if kept is not None and kept.outputs:
        logits, targets = kept.joined()
    if model.calibration is not None and logits is not None:  # its ECE and NLL with and without the temperature
        from .calibration import figures

        after, before = figures(model.task.kind, logits, targets, model.temperature), \
            figures(model.task.kind, logits, targets)
        metrics.update(ece=after["ece"], nll=after["nll"], ece_uncalibrated=before["ece"],
                       nll_uncalibrated=before["nll"], temperature=model.temperature)
    metrics["skipped"] = skipped
    return metrics, logits, targets
