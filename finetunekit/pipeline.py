"""The builder: turns a Recipe into data, model, strategy, optimizer and loop, runs them, writes the run.

Components receive plain typed arguments from here, never the Recipe itself.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import resource
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import TASKS, Recipe, build_recipe, flatten
from .errors import TrainingStopped, UserError
from .rundir import MARKER, RunDir, check_out, is_run

log = logging.getLogger("finetunekit")

RECIPE = "recipe.yaml"  # the run's resolved recipe: what --resume continues



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


def _default_out(spec: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.split(":")[-1])
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


class _RunLog:
    """Log lines to stderr and, once `attach` names it, to <run>/log.txt for the duration of a run. Lines
    logged before `attach` (a run checks its data and model before it claims its folder) are kept and
    written to the file first."""

    def __init__(self, path: Path | None, quiet: bool):
        self.handlers: list[logging.Handler] = []
        if not any(getattr(h, "_finetunekit", False) for h in log.handlers):
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(message)s"))
            self.handlers.append(console)
        self.early = _Buffer()
        self.handlers.append(self.early)
        if path is not None:
            self.attach(path)

    def attach(self, path: Path) -> None:
        file = logging.FileHandler(path, encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for record in self.early.records:
            file.handle(record)
        if self.early in log.handlers:
            log.removeHandler(self.early)
        self.handlers.remove(self.early)
        file._finetunekit = True  # type: ignore[attr-defined]
        if any(h in log.handlers for h in self.handlers):  # entered: the file takes over from the buffer now
            log.addHandler(file)
        self.handlers.append(file)

    def __enter__(self):
        for h in self.handlers:
            h._finetunekit = True  # type: ignore[attr-defined]
            log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
        return self

    def __exit__(self, *exc):
        for h in self.handlers:
            log.removeHandler(h)
            h.close()


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _accelerator(precision: str, grad_accum: int, cpu: bool, run_dir: Path | None):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    # one Accelerator per run, also when several runs share a process (tests, notebooks, sweeps)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gpu = torch.cuda.is_available() and not cpu
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu else "no"
    if precision == "fp16" and not gpu:
        raise UserError("--precision fp16: needs a GPU; use bf16 or no on the CPU")
    kwargs: dict[str, Any] = {}
    if run_dir is not None:
        kwargs = dict(log_with="tensorboard", project_dir=str(run_dir))
    # on a GPU, batches go to the device without blocking the host (the image loaders pin their memory)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=grad_accum, cpu=cpu,
                       dataloader_config=DataLoaderConfiguration(non_blocking=gpu), **kwargs)


def _peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"process": round(own, 1), "largest_worker": round(children, 1)}


def fit(recipe: Recipe | dict | str | Path | None = None, **overrides: Any) -> RunResult:
    """Fine-tune as `recipe` says (a Recipe, a dict, or a YAML path; keyword overrides win:
    `fit("r.yaml", **{"train.epochs": 3})`). Returns the run directory and its final metrics."""
    recipe = as_recipe(recipe, overrides)
    resume = None
    if recipe.resume:
        recipe, resume = _resume_recipe(recipe)
    preflight(recipe)
    out = recipe.out or _default_out(recipe.model_name)
    run_dir = None
    if resume is None:  # a new run: nothing at --out changes until its data and model have been checked
        d = recipe.data
        check_out(out, overwrite=recipe.overwrite, inputs={
            "--data": d.path, "--val": d.val, "--test": d.test, "--config": recipe.config_path,
            "--weights": recipe.model.weights, "--synonyms": d.synonyms})
        run_dir = RunDir(out)
    with _RunLog(out / "log.txt" if resume is not None else None, recipe.quiet) as run_log:
        try:
            result = _fit(recipe, out, resume, run_dir, run_log)
        except BaseException:
            from . import checkpoint

            if run_dir is not None:  # failed before its first checkpoint: the folder goes back as it was
                run_dir.finish() if checkpoint.latest(out) is not None else run_dir.abort()
            raise
    if run_dir is not None:
        run_dir.finish()
    return result


# options that only one kind of input reads: setting one for the other is a mistake worth a message
_TEXT_ONLY = {"data": ("text_column", "max_length", "group_by_length",
                       "token_delete", "token_swap", "token_mask", "synonyms", "synonym_prob"),
              "model": ("trust_remote_code",)}
_IMAGE_ONLY = {"data": ("image_size", "augment", "mixup", "cutmix", "mixup_off_epoch", "rotate", "elastic",
                        "vflip", "tta", "cache_views", "cache_images"),
               "model": ("drop_path", "head")}


def preflight(recipe: Recipe) -> None:
    """Checks that need no data scan: paths exist, options fit the task, the model name resolves."""
    d, m, t = recipe.data, recipe.model, recipe.train
    modality, losses, monitors = TASKS[recipe.task]
    if d.path is None:
        raise UserError("--data: required: " + ("a folder of class folders, a folder with train/ and val/, "
                                                "or a CSV manifest path,label" if modality == "image" else
                                                "a CSV, TSV, JSONL or Parquet table"))
    for flag, path in (("--data", d.path), ("--val", d.val), ("--test", d.test), ("--weights", m.weights),
                       ("--synonyms", d.synonyms)):
        if path is not None and not path.exists():
            raise UserError(f"{flag} {path}: no such file or folder")
    wrong = _TEXT_ONLY if modality == "image" else _IMAGE_ONLY
    for section, names in wrong.items():
        part = getattr(recipe, section)
        for name in names:
            if getattr(part, name) != type(part).model_fields[name].default:
                raise UserError(f"--{name.replace('_', '-')}: does not apply to --task {recipe.task}")
    if recipe.task == "image-classification":
        for name in ("label_column", "label_delimiter"):
            if getattr(d, name) is not None:
                raise UserError(f"--{name.replace('_', '-')}: does not apply to --task image-classification "
                                f"(class folders, or a manifest with columns path,label)")
    if (d.mixup or d.cutmix) and recipe.task != "image-classification":
        raise UserError(f"--mixup/--cutmix: for --task image-classification, not {recipe.task}")
    if (d.mixup or d.cutmix) and t.batch_size != "auto" and t.batch_size % 2:
        raise UserError(f"--batch-size {t.batch_size}: MixUp/CutMix mix each batch with its reverse and need an "
                        f"even batch size")
    if (d.mixup or d.cutmix) and t.loss == "focal":
        raise UserError("--loss focal: does not take the soft targets of MixUp/CutMix; use ce")
    if t.loss != "auto" and t.loss not in losses:
        raise UserError(f"--loss {t.loss}: for --task {recipe.task} expected one of {', '.join(losses)}")
    if t.metric != "auto" and t.metric not in monitors:
        raise UserError(f"--metric {t.metric}: for --task {recipe.task} expected one of {', '.join(monitors)}")
    from .checkpoint import parse_period
    from .models import check_spec, modality as model_modality  # imports torch: after the instant checks
    from .models.heads import check_head

    check_head(m.head)
    parse_period(t.checkpoint_every)

    check_spec(recipe.model_name, modality)
    if model_modality(recipe.model_name, modality) != modality:  # hf: reads what the task needs
        hint = "hf:<hub id or folder> or minilm" if modality == "text" else \
            "timm:<name>, torchvision:<name>, hf:<hub id or folder> or efficientnet_lite0"
        article = "an" if modality == "image" else "a"
        raise UserError(f"--model {recipe.model_name}: reads {model_modality(recipe.model_name, modality)}s, but "
                        f"--task {recipe.task} needs {article} {modality} model ({hint})")


@dataclass
class Resume:
    checkpoint: Path
    changed: list[str]  # recipe keys that differ from the interrupted run's ("train.batch_size: 32 -> 64")
    skipped: list[tuple[Path, str]]  # newer checkpoints that were damaged


_RUN_KEYS = {"out", "overwrite", "resume", "resume_force", "quiet"}


def _resume_recipe(recipe: Recipe) -> tuple[Recipe, Resume | None]:
    """The interrupted run's recipe with the options given now on top, and its latest complete checkpoint.
    `--resume auto` with no checkpoint at --out is a new run."""
    from . import checkpoint

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
    saved = Recipe.load(run / RECIPE)
    given = {k: v for k, v in recipe.model_dump(mode="json", exclude_unset=True).items() if k not in _RUN_KEYS}
    merged = build_recipe(saved.model_dump(mode="json"), given) if given else saved
    before, after = flatten(saved.model_dump(mode="json")), flatten(merged.model_dump(mode="json"))
    changed = [f"{k}: {before.get(k)} -> {after.get(k)}" for k in sorted(after)
               if k.split(".")[0] not in _RUN_KEYS and before.get(k) != after.get(k)]
    merged = merged.model_copy(update={"out": run, "resume": None, "resume_force": recipe.resume_force,
                                       "quiet": recipe.quiet, "overwrite": False})
    return merged, Resume(found.path, changed, found.skipped)


def plan_and_optimizer(recipe: Recipe, backbone, lr: float, fused: bool = False):
    """The recipe's strategy plan (its first phase applied) and the optimizer over every parameter."""
    from .optim import build_optimizer
    from .strategies import apply_phase, make_plan

    t = recipe.train
    plan = make_plan(t.strategy, backbone, t.epochs, head_epochs=t.head_epochs, unfreeze_every=t.unfreeze_every,
                     freeze=t.freeze, freeze_types=t.freeze_types, freeze_layers=t.freeze_layers)
    apply_phase(plan.phases[0], backbone.module)
    optimizer = build_optimizer(backbone, lr, t.weight_decay, name=t.optimizer, momentum=t.momentum,
                                layer_decay=t.layer_decay, head_lr_mult=t.head_lr_mult, fused=fused)
    return plan, optimizer


def _fit(recipe: Recipe, out: Path, resume: Resume | None, run_dir: RunDir | None, run_log: _RunLog) -> RunResult:
    import torch
    from accelerate.utils import set_seed

    from . import fastpath, loop
    from .artifacts import save_model_folder, write_history, write_json
    from .inputs import prepare_inputs
    from .optim import DEFAULT_MIN_LR_RATIO, DEFAULT_SCHEDULER, build_scheduler, default_lr, default_warmup
    from .tasks import LOWER_IS_BETTER

    started = time.perf_counter()
    d, m, t = recipe.data, recipe.model, recipe.train
    set_seed(t.seed)
    accelerator = _accelerator(t.precision, t.grad_accum, t.cpu, out)
    gpu = accelerator.device.type == "cuda"
    if t.batch_size == "auto":
        recipe, inputs = _auto_batch(recipe, accelerator)
        d, m, t = recipe.data, recipe.model, recipe.train
    else:
        inputs = prepare_inputs(recipe, gpu=gpu)
    backbone, task = inputs.backbone, inputs.task
    if run_dir is not None:  # data and model are good: the run takes its folder
        run_dir.claim()
        run_log.attach(out / "log.txt")
    log.info("finetunekit: %s, fitting %s on %s -> %s", recipe.task, recipe.model_name, d.path, out)
    for line in inputs.summary:
        log.info("%s", line)
    weights = getattr(task, "class_weights", None) if t.class_weights else None
    if weights is not None:
        log.info("class weights: %s", ", ".join(f"{c} {float(w):g}" for c, w in zip(task.classes, weights)))

    effective_batch = t.batch_size * t.grad_accum * accelerator.num_processes
    lr = t.lr or default_lr(recipe.modality, t.strategy,
                            effective_batch, t.optimizer)
    kind = DEFAULT_SCHEDULER[recipe.modality] if t.scheduler == "auto" else t.scheduler
    warmup = t.warmup if t.warmup is not None else \
        0.3 * t.epochs if kind == "onecycle" else default_warmup(recipe.modality, t.epochs)
    min_lr_ratio = DEFAULT_MIN_LR_RATIO[kind] if t.min_lr_ratio is None else t.min_lr_ratio
    monitor = task.default_monitor if t.metric == "auto" else t.metric
    from . import checkpoint
    from .strategies import Phase, Plan

    data_hash, split_hashes, leaked = checkpoint.content_hash(inputs.sources)
    if leaked:
        log.warning("warning: %d validation images are byte-identical to training images (leakage: validation "
                    "scores will be optimistic)", leaked)
    # fused AdamW: one kernel per update on GPUs; on the CPU too (4.8 vs 21.1 ms per EfficientNet-Lite0 step)
    plan, optimizer = plan_and_optimizer(recipe, backbone, lr, fused=accelerator.device.type in ("cuda", "cpu"))
    trained, train_loader, val_loader = backbone.module, inputs.train_loader, inputs.val_loader
    cached = normalize = None
    if t.strategy == "linear-probe":
        from . import features

        reason = features.why_not(recipe, backbone)
        if reason is None:
            cached = _cached_features(recipe, inputs, split_hashes, accelerator.device)
            trained, train_loader, val_loader = cached
            plan = Plan(plan.strategy, [Phase(0, frozenset(n for n, _ in trained.named_parameters()), 1.0,
                                              "the head, on cached features")])
        else:
            log.info("features not cached: %s", reason)
    if cached is None and recipe.modality == "image":
        decoded = _decoded_loaders(recipe, inputs, split_hashes, pin_memory=gpu)
        if decoded is not None:
            train_loader, val_loader, normalize = decoded
        inputs.resolved["data.cache_images"] = "on" if decoded is not None else "off"  # a resume does the same
    if recipe.modality == "image" and fastpath.channels_last(trained):
        log.info("channels_last memory format (a CNN)")  # cuDNN's and oneDNN's fastest convolution layout
    module, optimizer, train_loader, val_loader = accelerator.prepare(trained, optimizer, train_loader, val_loader)
    if t.compile:
        module = fastpath.compile_with_fallback(module)
        log.info("--compile: torch.compile compiles the model during the first batches")
    updates_per_epoch = -(-len(train_loader) // t.grad_accum)
    scheduler = build_scheduler(optimizer, kind=kind, epochs=t.epochs, updates_per_epoch=updates_per_epoch,
                                warmup_epochs=warmup, min_lr_ratio=min_lr_ratio, restart_epochs=t.restart_epochs,
                                plateau_mode="min" if monitor in LOWER_IS_BETTER else "max")

    fingerprint = {"data": data_hash, "classes": task.classes, "cached_features": cached is not None,
                   "model": recipe.model_name, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                   "processes": accelerator.num_processes}
    checkpoints = checkpoint.Checkpoints(out, every=t.checkpoint_every, keep=t.keep_checkpoints,
                                         fingerprint=fingerprint, scaler=accelerator.scaler,
                                         is_main=accelerator.is_main_process)
    state, rng = (None, None) if resume is None else \
        _restore(resume, recipe, accelerator.unwrap_model(module, keep_torch_compile=False), optimizer, scheduler,
                 checkpoints, accelerator)

    resolved = recipe.model_copy(deep=True)
    resolved.out, resolved.train.lr, resolved.train.scheduler = out, lr, kind
    resolved.resume, resolved.resume_force, resolved.overwrite = None, False, False
    resolved.train.warmup, resolved.train.min_lr_ratio, resolved.train.metric = warmup, min_lr_ratio, monitor
    for key, value in inputs.resolved.items():
        section, name = key.split(".")
        setattr(getattr(resolved, section), name, value)
    (out / RECIPE).write_text(resolved.to_yaml(), encoding="utf-8")
    write_json(out / "split.json", inputs.split_record)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    frozen = f", first {t.freeze_layers} layers frozen" if t.freeze_layers else ""
    frozen += f", frozen: {t.freeze}" if t.freeze else ""
    frozen += f", frozen types: {t.freeze_types}" if t.freeze_types else ""
    log.info("model: %s (%s:%s), %.2fM parameters, %.2fM trainable (%s%s); %s; device %s, precision %s",
             recipe.model_name, backbone.source, backbone.architecture, total / 1e6, trainable / 1e6, t.strategy,
             frozen, inputs.input_desc, accelerator.device, accelerator.mixed_precision)
    extras = (f", layer decay {t.layer_decay:g}" if t.layer_decay else "") + \
        (f", head lr x{t.head_lr_mult:g}" if t.head_lr_mult != 1.0 else "")
    log.info("optimizer: %s lr %.3g (effective batch %d), weight decay %g%s, warmup %g epochs + %s decay; "
             "%d updates/epoch", t.optimizer, lr, effective_batch, t.weight_decay, extras, warmup, kind, updates_per_epoch)

    model_dir = out / "model"

    def on_best(epoch: int, val: dict, weights) -> None:
        if accelerator.is_main_process:
            full = weights if cached is None else _with_head(backbone, weights)
            save_model_folder(model_dir, dataclasses.replace(backbone, module=full), task.classes,
                              recipe.model_name, recipe.task,
                              {**inputs.extra_config, **({"tta": tta} if tta != "none" else {})})

    accelerator.init_trackers("tensorboard")
    mixup = None
    if recipe.modality == "image" and (d.mixup or d.cutmix):
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=d.mixup or 0.0, cutmix_alpha=d.cutmix or 0.0, label_smoothing=t.label_smoothing,
                      num_classes=task.num_outputs)
        log.info("MixUp %g, CutMix %g%s", d.mixup or 0, d.cutmix or 0,
                 f", off from epoch {d.mixup_off_epoch}" if d.mixup_off_epoch else "")
    tta = d.tta if recipe.modality == "image" else "none"
    penalty = None
    if t.l1_penalty:
        head_weights = [p for n, p in backbone.module.named_parameters() if backbone.is_head(n) and p.ndim >= 2]
        log.info("L1 penalty %g on %d head weight tensors (%d values)", t.l1_penalty, len(head_weights),
                 sum(p.numel() for p in head_weights))

        def penalty():
            return t.l1_penalty * sum(p.abs().sum() for p in head_weights)
    cfg = loop.LoopConfig(epochs=t.epochs, plan=plan, clip_grad=t.clip_grad, mixup=mixup,
                          mixup_off_epoch=d.mixup_off_epoch, tta=tta, ema_decay=t.ema, penalty=penalty,
                          monitor=monitor, patience=t.early_stopping, min_delta=t.early_stopping_delta,
                          quiet=recipe.quiet, max_nonfinite=t.max_nonfinite, normalize=normalize)
    if rng is not None:
        checkpoint.restore_rng(*rng)  # last: nothing between here and the first batch draws a random number
    with checkpoints:
        try:
            result = loop.fit(accelerator, module, optimizer, scheduler, train_loader, val_loader, task, cfg,
                              on_best, state=state, checkpoints=checkpoints)
        except torch.OutOfMemoryError:
            last = checkpoint.latest(out)
            raise TrainingStopped(
                f"out of {'GPU ' if gpu else ''}memory at batch size {t.batch_size}; the last complete checkpoint "
                f"is {last.path if last else 'none yet'}; continue with a smaller batch and the same effective "
                f"batch: `finetunekit fit --resume {out} --batch-size {max(1, t.batch_size // 2)} --grad-accum "
                f"{t.grad_accum * 2} --resume-force`") from None
    write_history(out / "history.csv", result.history)
    if accelerator.is_main_process:  # finished: the best model is in model/; the last checkpoint can extend the run
        checkpoint.prune(out / checkpoint.CHECKPOINTS, keep=1, protect=set())
    if result.best_epoch < 0:
        accelerator.end_training()
        raise UserError(f"training produced no finite validation {monitor}; no model was saved "
                        f"(try a lower --lr)")

    metrics: dict[str, Any] = {"val": result.best_val}  # the saved weights': no second validation pass
    if inputs.test_loader is not None:
        # the test set is scored once, by the best checkpoint exactly as saved
        from .artifacts import load_weights_file

        accelerator.wait_for_everyone()
        scorer = module if cached is None else accelerator.prepare(backbone.module)  # the whole model
        load_weights_file(accelerator.unwrap_model(scorer, keep_torch_compile=False), model_dir)
        test_loader = accelerator.prepare(inputs.test_loader)
        metrics["test"] = loop.evaluate(accelerator, scorer, test_loader, task, desc="test", quiet=recipe.quiet,
                                        tta=tta)
    accelerator.end_training()
    train_rates = [r["train_samples_per_s"] for r in result.history]
    metrics.update(
        task=recipe.task, model=recipe.model_name, strategy=t.strategy, classes=task.classes,
        **{k.split(".")[1]: v for k, v in inputs.resolved.items() if k in ("data.image_size", "data.max_length")},
        best_epoch=result.best_epoch, epochs_run=len(result.history), stopped_early=result.stopped_early,
        monitor=monitor, train_seconds=round(result.train_seconds, 2),
        train_samples_per_s=round(sum(train_rates) / len(train_rates), 1),
        wall_seconds=round(time.perf_counter() - started, 2), skipped=inputs.skipped,
        peak_rss_mb=_peak_rss_mb(), device=str(accelerator.device), precision=accelerator.mixed_precision,
        skipped_updates=result.skipped, **({"resumed_from": str(resume.checkpoint)} if resume else {}),
    )
    if torch.cuda.is_available() and gpu:
        metrics["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_json(out / "metrics.json", metrics)
    final = metrics.get("test", metrics["val"])
    log.info("done in %.0fs: best epoch %d; %s %s; run: %s", metrics["wall_seconds"], result.best_epoch,
             "test" if "test" in metrics else "val", ", ".join(f"{k} {final[k]:.4f}" for k in task.headline), out)
    return RunResult(out, metrics)


def _cached_features(recipe: Recipe, inputs, split_hashes: dict[str, str], device):
    """The head to train (with the model's dropout in front, if any) and loaders over cached features."""
    import timm
    import torch

    from . import features
    from .checkpoint import sha256_file
    from .data import make_loader

    d, m, t = recipe.data, recipe.model, recipe.train
    backbone = inputs.backbone
    views = d.cache_views or 1
    augmented = features.augmented(recipe)
    common = {"format": features.FORMAT, "model": recipe.model_name, "pretrained": m.pretrained,
              "weights": sha256_file(m.weights) if m.weights else None, "head": backbone.heads[0],
              "preprocessing": backbone.preprocessing.to_dict(), "torch": torch.__version__,
              "timm": timm.__version__}
    out = {}
    for split, loader, aug in (("train", inputs.train_loader, augmented), ("val", inputs.val_loader, False)):
        ds = loader.dataset
        parts = {**common, "data": split_hashes[split], "transform": repr(ds.transform),
                 "views": views if aug else 1, "seed": t.seed if aug else None}
        started = time.perf_counter()
        x, y, hit = features.load_or_extract(parts, lambda: features.extract(
            backbone, ds, views=parts["views"], seed=t.seed, augmented=aug, device=device,
            batch_size=t.batch_size * 2, workers=inputs.resolved.get("data.num_workers", 0)))
        log.info("features (%s): %d x %d%s, %s in %.1fs", split, x.shape[1], x.shape[2],
                 f" x {x.shape[0]} views" if x.shape[0] > 1 else "", "read from the cache" if hit else "computed",
                 time.perf_counter() - started)
        out[split] = make_loader(features.Features(x, y), t.batch_size * (1 if split == "train" else 2),
                                 train=split == "train", workers=0, seed=t.seed)
    head = backbone.module.get_submodule(backbone.heads[0])
    trained = features.WithDropout(m.dropout, head) if m.dropout and m.head == "linear" else head
    return trained, out["train"], out["val"]


def _decoded_loaders(recipe: Recipe, inputs, split_hashes: dict[str, str], pin_memory: bool):
    """Training and validation loaders over the decoded-image cache (uint8 batches) and the Normalize that
    turns their batches into the model's input; None when the cache is off or does not pay."""
    from .data import make_loader
    from .data.decoded import Normalize, decoded_datasets

    d, t = recipe.data, recipe.train
    pre = inputs.backbone.preprocessing
    datasets = decoded_datasets({"train": inputs.train_loader.dataset, "val": inputs.val_loader.dataset},
                                split_hashes, mode=d.cache_images, epochs=t.epochs, pre=pre, augment=d.augment,
                                rotate=d.rotate, elastic=d.elastic, vflip=d.vflip)
    if datasets is None:
        return None
    workers = inputs.resolved["data.num_workers"]
    train, val = (make_loader(datasets[s], t.batch_size * (1 if s == "train" else 2), train=s == "train",
                              workers=workers, seed=t.seed, pin_memory=pin_memory) for s in ("train", "val"))
    return train, val, Normalize(pre.mean, pre.std)


def _with_head(backbone, trained):
    """The whole model carrying `trained`'s head weights (the trained head itself, or its EMA copy)."""
    import copy

    from .features import head_of

    head, name = head_of(trained), backbone.heads[0]
    if head is backbone.module.get_submodule(name):
        return backbone.module
    full = copy.deepcopy(backbone.module)
    full.get_submodule(name).load_state_dict(head.state_dict())
    return full


AUTO_BATCH = 32  # --batch-size auto aims at an effective batch of this x --grad-accum


def _auto_batch(recipe: Recipe, accelerator):
    """--batch-size auto: the largest of AUTO_BATCH x grad_accum, half that, ... whose forward and backward
    pass on real training samples fits in memory, with grad_accum raised to keep the effective batch.
    Returns the recipe with the numbers filled in and its prepared inputs."""
    import torch

    from . import faults
    from .inputs import prepare_inputs
    from .loop import forward

    target = AUTO_BATCH * recipe.train.grad_accum
    size = target
    while True:
        trial = recipe.model_copy(deep=True)
        trial.train.batch_size, trial.train.grad_accum = size, -(-target // size)
        inputs = prepare_inputs(trial, gpu=accelerator.device.type == "cuda")
        module = inputs.backbone.module.to(accelerator.device)
        loader = inputs.train_loader
        samples = [loader.dataset[(i, 0)] for i in range(min(size, len(loader.dataset)))]
        x, y = loader.collate_fn(samples)
        x = {k: v.to(accelerator.device) for k, v in x.items()} if isinstance(x, dict) else x.to(accelerator.device)
        buffers = {k: b.clone() for k, b in module.named_buffers()}  # BatchNorm statistics: put back after
        try:
            faults.point("probe")
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())), accelerator.autocast():
                inputs.task.loss(forward(module, x), y.to(accelerator.device)).backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        module.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, b in module.named_buffers():
                b.copy_(buffers[k])
        if fits:
            break
        del module, inputs, x, y, buffers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size == 1:
            raise UserError("--batch-size auto: even a batch of 1 does not fit in memory; try a smaller "
                            "--image-size or --max-length, or another model")
        log.info("--batch-size auto: %d does not fit", size)
        size //= 2
    log.info("--batch-size auto: %d x --grad-accum %d (effective batch %d)", size, trial.train.grad_accum,
             size * trial.train.grad_accum)
    return trial, inputs


def _restore(resume: Resume, recipe: Recipe, model, optimizer, scheduler, checkpoints, accelerator):
    """Load a checkpoint into the run's objects after the drift guard; returns the TrainState to continue
    from and the RNG states to restore just before training."""
    from . import checkpoint
    from .fastpath import match_param_layout
    from .loop import TrainState
    from .optim import PlateauSchedule

    run = recipe.out
    for path, why in resume.skipped:
        log.warning("checkpoint %s: %s; falling back to an older one", path, why)
    tensors, meta = checkpoint.read(resume.checkpoint)
    old, new = meta["fingerprint"], checkpoints.fingerprint
    hard = [f"{k} {old.get(k)} -> {new[k]}" for k in ("model", "classes") if old.get(k) != new[k]]
    if hard:
        raise UserError(f"--resume {run}: cannot continue: {'; '.join(hard)} (the saved weights do not fit); "
                        f"start a new run")
    moved = [k for k in ("data", "batch_size", "grad_accum", "processes") if old.get(k) != new[k]]
    changes = [("the training data's content (SHA-256)" if k == "data" else f"{k} {old.get(k)} -> {new[k]}")
               for k in moved]
    changes += [c for c in resume.changed if not c.startswith(("train.batch_size", "train.grad_accum"))]
    state = TrainState.from_dict(meta["train"])
    if changes:
        if not recipe.resume_force:
            raise UserError(f"--resume {run}: the run changed since its checkpoint: {'; '.join(changes)}; pass "
                            f"--resume-force to continue anyway, or start a new run")
        log.warning("--resume-force: continuing although %s", "; ".join(changes))
        if moved and state.batch:
            log.warning("dropped: the position inside epoch %d (%d batches trained); the epoch restarts from "
                        "its first batch", state.epoch + 1, state.batch)
            state.batch = state.seen = 0
            state.loss_sum = state.running = state.epoch_seconds = 0.0
    model.load_state_dict(tensors["model.safetensors"])
    optimizer.load_state_dict(checkpoint.optimizer_state(tensors.get("optimizer.safetensors", {}),
                                                         meta["optimizer"]))
    match_param_layout(optimizer)  # channels_last weights: their moments too (fused AdamW reads flat memory)
    if isinstance(scheduler, PlateauSchedule):  # timm's schedules are functions of the update count
        scheduler.load_state_dict(meta["scheduler"])
    if meta.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    checkpoints.ema_weights = tensors.get("ema.safetensors")
    checkpoints.best_name = meta.get("best_checkpoint")
    checkpoint.truncate_steps(checkpoints.steps_csv, state.step)
    log.info("resuming from %s: epoch %d, batch %d, %d updates done", resume.checkpoint, state.epoch + 1,
             state.batch, state.updates)
    return state, (tensors["rng.safetensors"], meta["rng"])


def evaluate(run: str | Path, data: str | Path, batch_size: int = 64, quiet: bool = True,
             cpu: bool = False) -> dict:
    """Metrics of a saved model on labelled data in the form it was trained on (image folder or manifest;
    a table with the same columns for text). Labels must be the model's."""
    from . import loop
    from .artifacts import load

    model = load(run)
    loader, skipped = model.labelled_loader(Path(data), batch_size)
    accelerator = _accelerator("auto", 1, cpu, None)
    module, loader = accelerator.prepare(model.module, loader)
    metrics = loop.evaluate(accelerator, module, loader, model.task, quiet=quiet, tta=model.tta)
    metrics["skipped"] = skipped
    return metrics
