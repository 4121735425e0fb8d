"""The builder: turns a Recipe into data, model, strategy, optimizer and loop, runs them, writes the run.

Components receive plain typed arguments from here, never the Recipe itself.
"""

from __future__ import annotations

import logging
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Recipe, build_recipe
from .errors import UserError

log = logging.getLogger("finetunekit")

RUN_MARKER = "recipe.yaml"  # a directory holding this file is a finetunekit run


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def as_recipe(recipe: Recipe | dict | str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        return build_recipe(recipe.model_dump(), overrides or {}) if overrides else recipe
    if isinstance(recipe, (str, Path)):
        return Recipe.load(recipe, overrides)
    return build_recipe(recipe or {}, overrides or {})


def _default_out(spec: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.split(":")[-1])
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds anything, unless --overwrite says to replace it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            what = "a finetunekit run" if (out / RUN_MARKER).exists() else "files"
            raise UserError(f"--out {out}: already holds {what}; choose another --out or pass --overwrite")
        if not (out / RUN_MARKER).exists():
            raise UserError(f"--out {out}: --overwrite replaces finetunekit runs only, and this directory "
                            f"holds other files")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None


class _RunLog:
    """Log lines to stderr and to <run>/log.txt for the duration of a run."""

    def __init__(self, path: Path | None, quiet: bool):
        self.handlers: list[logging.Handler] = []
        if not any(getattr(h, "_finetunekit", False) for h in log.handlers):
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(message)s"))
            self.handlers.append(console)
        if path is not None:
            file = logging.FileHandler(path, encoding="utf-8")
            file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
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


def _accelerator(precision: str, grad_accum: int, cpu: bool, run_dir: Path | None):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

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
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=grad_accum, cpu=cpu, **kwargs)


def _peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"process": round(own, 1), "largest_worker": round(children, 1)}


def fit(recipe: Recipe | dict | str | Path | None = None, **overrides: Any) -> RunResult:
    """Fine-tune as `recipe` says (a Recipe, a dict, or a YAML path; keyword overrides win:
    `fit("r.yaml", **{"train.epochs": 3})`). Returns the run directory and its final metrics."""
    recipe = as_recipe(recipe, overrides)
    preflight(recipe)
    out = recipe.out or _default_out(recipe.model.name)
    created = not out.exists()
    prepare_run_dir(out, recipe.overwrite)
    try:
        with _RunLog(out / "log.txt", recipe.quiet):
            return _fit(recipe, out)
    except UserError:
        if created and not (out / RUN_MARKER).exists():  # failed before training: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def preflight(recipe: Recipe) -> None:
    """Checks that need no data scan: paths exist, the model name resolves."""
    d, m = recipe.data, recipe.model
    if d.path is None:
        raise UserError("--data: required: a folder of class folders, a folder with train/ and val/, "
                        "or a CSV manifest path,label")
    for flag, path in (("--data", d.path), ("--val", d.val), ("--test", d.test), ("--weights", m.weights)):
        if path is not None and not path.exists():
            raise UserError(f"{flag} {path}: no such file or folder")
    from .models import check_spec  # imports torch: after the instant checks

    check_spec(m.name)


def _fit(recipe: Recipe, out: Path) -> RunResult:
    import torch
    from accelerate.utils import set_seed

    from . import loop
    from .artifacts import save_model_folder, write_history, write_json
    from .data import ImageDataset, build_transform, default_workers, make_loader, resolve_splits
    from .models import create_backbone
    from .optim import build_optimizer, build_scheduler, default_lr
    from .strategies import apply_strategy
    from .tasks import Classification

    started = time.perf_counter()
    d, m, t = recipe.data, recipe.model, recipe.train
    log.info("finetunekit: fitting %s on %s -> %s", m.name, d.path, out)
    splits = resolve_splits(d.path, d.val, d.test, d.val_fraction, t.seed, d.max_bad_fraction)
    log.info("classes: %d; images: %d train, %d val%s (val: %s)", len(splits.classes), len(splits.train),
             len(splits.val), f", {len(splits.test)} test" if splits.test else "", splits.record["val"]["from"])

    set_seed(t.seed)
    accelerator = _accelerator(t.precision, t.grad_accum, t.cpu, out)
    backbone = create_backbone(m.name, len(splits.classes), pretrained=m.pretrained, weights=m.weights)
    backbone.preprocessing = backbone.preprocessing.with_size(d.image_size)
    apply_strategy(t.strategy, backbone)
    task = Classification(splits.classes, label_smoothing=t.label_smoothing)

    workers = default_workers() if d.num_workers is None else d.num_workers
    pin = accelerator.device.type == "cuda"
    train_tf = build_transform(backbone.preprocessing, d.augment)
    eval_tf = build_transform(backbone.preprocessing, "none")
    train_loader = make_loader(ImageDataset(splits.train, train_tf), t.batch_size, train=True, workers=workers,
                               seed=t.seed, pin_memory=pin)
    val_loader = make_loader(ImageDataset(splits.val, eval_tf), t.batch_size * 2, train=False, workers=workers,
                             seed=t.seed, pin_memory=pin)

    effective_batch = t.batch_size * t.grad_accum * accelerator.num_processes
    lr = t.lr or default_lr(t.strategy, effective_batch)
    optimizer = build_optimizer(backbone.module, lr, t.weight_decay, fused=accelerator.device.type == "cuda")
    module, optimizer, train_loader, val_loader = accelerator.prepare(backbone.module, optimizer, train_loader,
                                                                      val_loader)
    updates_per_epoch = -(-len(train_loader) // t.grad_accum)
    scheduler = build_scheduler(optimizer, epochs=t.epochs, updates_per_epoch=updates_per_epoch,
                                warmup_epochs=t.warmup, min_lr_ratio=t.min_lr_ratio)

    resolved = recipe.model_copy(deep=True)
    resolved.out, resolved.train.lr, resolved.data.image_size = out, lr, backbone.preprocessing.input_size
    resolved.data.num_workers = workers
    (out / RUN_MARKER).write_text(resolved.to_yaml(), encoding="utf-8")
    write_json(out / "split.json", {"classes": splits.classes, **splits.record,
                                    "skipped": [{"path": p, "reason": r} for p, r in splits.skipped]})
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    log.info("model: %s (%s:%s), %.2fM parameters, %.2fM trainable (%s); input %dpx; device %s, precision %s",
             m.name, backbone.source, backbone.architecture, total / 1e6, trainable / 1e6, t.strategy,
             backbone.preprocessing.input_size, accelerator.device, accelerator.mixed_precision)
    log.info("optimizer: AdamW lr %.3g (effective batch %d), weight decay %g, warmup %g epochs + cosine; "
             "%d updates/epoch", lr, effective_batch, t.weight_decay, t.warmup, updates_per_epoch)

    model_dir = out / "model"
    best_val: dict = {}

    def on_best(epoch: int, val: dict) -> None:
        best_val.clear()
        best_val.update(val)  # the saved weights' validation metrics: no second validation pass
        if accelerator.is_main_process:
            save_model_folder(model_dir, backbone, splits.classes, m.name)

    accelerator.init_trackers("tensorboard")
    cfg = loop.LoopConfig(epochs=t.epochs, strategy=t.strategy, head=backbone.head, clip_grad=t.clip_grad,
                          monitor=t.metric, patience=t.early_stopping, quiet=recipe.quiet)
    result = loop.fit(accelerator, module, optimizer, scheduler, train_loader, val_loader, task, cfg, on_best)
    write_history(out / "history.csv", result.history)
    if result.best_epoch < 0:
        accelerator.end_training()
        raise UserError(f"training produced no finite validation {t.metric}; no model was saved "
                        f"(try a lower --lr)")

    metrics: dict[str, Any] = {"val": best_val}
    if splits.test is not None:
        # the test set is scored once, by the best checkpoint exactly as saved
        from safetensors.torch import load_file

        accelerator.wait_for_everyone()
        accelerator.unwrap_model(module).load_state_dict(load_file(str(model_dir / "model.safetensors")))
        test_loader = accelerator.prepare(make_loader(ImageDataset(splits.test, eval_tf), t.batch_size * 2,
                                                      train=False, workers=workers, seed=t.seed, pin_memory=pin))
        metrics["test"] = loop.evaluate(accelerator, module, test_loader, task, desc="test", quiet=recipe.quiet)
    accelerator.end_training()
    train_rates = [r["train_images_per_s"] for r in result.history]
    metrics.update(
        model=m.name, strategy=t.strategy, image_size=backbone.preprocessing.input_size, classes=splits.classes,
        best_epoch=result.best_epoch, epochs_run=len(result.history), stopped_early=result.stopped_early,
        monitor=t.metric, train_seconds=round(result.train_seconds, 2),
        train_images_per_s=round(sum(train_rates) / len(train_rates), 1),
        wall_seconds=round(time.perf_counter() - started, 2), skipped_files=len(splits.skipped),
        peak_rss_mb=_peak_rss_mb(), device=str(accelerator.device), precision=accelerator.mixed_precision,
    )
    if torch.cuda.is_available() and accelerator.device.type == "cuda":
        metrics["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_json(out / "metrics.json", metrics)
    final = metrics.get("test", metrics["val"])
    log.info("done in %.0fs: best epoch %d; %s accuracy %.4f, macro-F1 %.4f; run: %s",
             metrics["wall_seconds"], result.best_epoch, "test" if "test" in metrics else "val",
             final["accuracy"], final["macro_f1"], out)
    return RunResult(out, metrics)


def evaluate(run: str | Path, data: str | Path, batch_size: int = 64, quiet: bool = True,
             cpu: bool = False) -> dict:
    """Metrics of a saved model on a labelled folder or CSV manifest (labels must be the model's)."""
    from . import loop
    from .artifacts import load
    from .data import ImageDataset, default_workers, make_loader
    from .data.sources import drop_unreadable, labeled_split, read_labeled_files

    model = load(run)
    files = read_labeled_files(Path(data), "--data")
    skipped, _ = drop_unreadable([files])
    split = labeled_split(files, model.classes, "the model's classes")
    accelerator = _accelerator("auto", 1, cpu, None)
    loader = make_loader(ImageDataset(split, model.transform), batch_size, train=False,
                         workers=default_workers(), seed=0)
    module, loader = accelerator.prepare(model.module, loader)
    metrics = loop.evaluate(accelerator, module, loader, model.task, quiet=quiet)
    metrics["skipped_files"] = len(skipped)
    return metrics
