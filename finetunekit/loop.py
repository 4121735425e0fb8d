"""The one training loop. accelerate does devices, precision, accumulation and distribution."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .strategies import Plan, apply_phase, set_train_mode
from .tasks import LOWER_IS_BETTER

log = logging.getLogger("finetunekit")


@dataclass
class LoopConfig:
    epochs: int
    plan: Plan  # which parameters train in each epoch, at what lr multiple
    clip_grad: float | None = None
    monitor: str = "accuracy"  # validation metric that picks the best epoch (see Recipe.train.metric)
    patience: int | None = None  # early stopping: epochs without improvement
    min_delta: float = 0.0  # early stopping: the smallest change of the monitored metric that counts
    quiet: bool = False
    log_every: int = 25  # steps between progress updates (each one syncs with the device)
    mixup: Callable | None = None  # images: (x, y) -> (mixed x, soft targets), e.g. timm.data.Mixup
    mixup_off_epoch: int | None = None  # 1-based epoch from which batches are no longer mixed
    tta: str = "none"  # test-time augmentation at validation: none | flip | crops | flip-crops (tta_views)
    ema_decay: float | None = None  # keep an EMA of the weights; evaluated each epoch, saved when it scores better
    penalty: Callable[[], torch.Tensor] | None = None  # added to the training loss (e.g. an L1 penalty)


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_value: float
    stopped_early: bool
    train_seconds: float


def _score(monitor: str, val: dict) -> tuple[float, float]:
    """Higher is better; ties on the metric (common with accuracy on small sets) go to the lower loss."""
    value = -val[monitor] if monitor in LOWER_IS_BETTER else val[monitor]
    return (value, 0.0) if monitor == "loss" else (value, -val["loss"])


class EarlyStopping:
    """Stop after `patience` epochs in which the score (see _score) has not beaten the last score that
    counted by more than `min_delta`."""

    def __init__(self, patience: int | None, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.reference: tuple[float, float] | None = None
        self.stale = 0

    def update(self, score: tuple[float, float]) -> bool:
        """Record an epoch's score; True when training should stop."""
        if _better((score[0] - self.min_delta, score[1]), self.reference):
            self.reference, self.stale = score, 0
        else:
            self.stale += 1
        return bool(self.patience) and self.stale >= self.patience


def forward(module: torch.nn.Module, x: Any, tta: str = "none") -> torch.Tensor:
    """Logits [B, num_outputs] from a batch: a tensor (images) or a dict of tensors (tokenized text).
    With test-time augmentation (images), the mean of the logits over the views of `tta_views`."""
    if tta != "none":
        views = tta_views(x, tta)
        return sum(module(v) for v in views) / len(views)
    out = module(**x) if isinstance(x, Mapping) else module(x)
    return getattr(out, "logits", out)  # transformers models return a ModelOutput


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """Views of an image batch [B, C, H, W]: the batch itself; 'flip' adds its mirror; 'crops' adds the
    centre and the four corner crops of 7/8 of each side, resized back to H x W; 'flip-crops' adds both."""
    views = [x]
    if tta in ("flip", "flip-crops"):
        views.append(x.flip(-1))
    if tta in ("crops", "flip-crops"):
        h, w = x.shape[-2:]
        ch, cw = round(h * 7 / 8), round(w * 7 / 8)
        for top, left in ((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw):
            crop = x[..., top:top + ch, left:left + cw]
            views.append(torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return views


def _better(score: tuple[float, float], best: tuple[float, float] | None) -> bool:
    if not all(math.isfinite(s) for s in score):
        return False  # a NaN/Inf metric is never "best"
    return best is None or score > best


def fit(accelerator: Accelerator, module: torch.nn.Module, optimizer, scheduler, train_loader: DataLoader,
        val_loader: DataLoader, task, cfg: LoopConfig,
        on_best: Callable[[int, dict, torch.nn.Module], None]) -> FitResult:
    """Train for `cfg.epochs`, evaluate after each epoch, call `on_best(epoch, val, weights)` on improvement
    (`weights`: the trained module, or its EMA when that scored better)."""
    history: list[dict] = []
    best: tuple[float, float] | None = None
    best_epoch, updates = -1, 0
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    train_seconds = 0.0
    inner = accelerator.unwrap_model(module)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(inner, decay=cfg.ema_decay, use_warmup=True)  # decay ramps up over the first steps
    phase = None
    for epoch in range(cfg.epochs):
        if cfg.plan.phase_at(epoch) is not phase:
            phase = cfg.plan.phase_at(epoch)
            apply_phase(phase, inner, optimizer)
            params = [p for p in module.parameters() if p.requires_grad]
            if epoch > 0 or len(cfg.plan.phases) > 1:
                log.info("epoch %d: %s trains (%d tensors, lr x%g)", epoch + 1, phase.description, len(params),
                         phase.lr_mult)
        set_train_mode(module, inner)
        loss_sum = torch.zeros((), device=accelerator.device)
        running = torch.zeros((), device=accelerator.device)  # task.running_metric, summed over samples
        seen = 0
        start = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=cfg.quiet or not accelerator.is_local_main_process)
        mix = cfg.mixup if cfg.mixup_off_epoch is None or epoch + 1 < cfg.mixup_off_epoch else None
        for step, (x, y) in enumerate(bar):
            with accelerator.accumulate(module):
                inputs, target = mix(x, y) if mix is not None else (x, y)  # soft targets [B, N] when mixed
                logits = forward(module, inputs)  # [B, num_outputs]
                loss = task.loss(logits, target)  # logged as the train loss: the penalty is not in it
                accelerator.backward(loss + cfg.penalty() if cfg.penalty is not None else loss)
                if accelerator.sync_gradients:
                    if cfg.clip_grad:
                        accelerator.clip_grad_norm_(params, cfg.clip_grad)
                    updates += 1
                optimizer.step()  # a no-op inside an accumulation window (accelerate)
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    scheduler.step_update(num_updates=updates)
                    if ema is not None:
                        ema.update(inner, step=updates)
            loss_sum += loss.detach() * len(y)
            running += task.running(logits.detach(), y)
            seen += len(y)
            if not bar.disable and step % cfg.log_every == 0:
                elapsed = time.perf_counter() - start
                bar.set_postfix({"loss": f"{loss_sum.item() / seen:.4f}",
                                 task.running_metric: f"{running.item() / seen:.3f}",
                                 "samples/s": f"{seen / max(elapsed, 1e-9):.0f}"})
        bar.close()
        epoch_seconds = time.perf_counter() - start
        train_seconds += epoch_seconds
        val = evaluate(accelerator, module, val_loader, task, desc="validate", quiet=cfg.quiet, tta=cfg.tta)
        weights = inner
        if ema is not None:
            val_ema = evaluate(accelerator, ema.module, val_loader, task, desc="validate EMA", quiet=cfg.quiet,
                               tta=cfg.tta)
            ema_wins = _better(_score(cfg.monitor, val_ema), _score(cfg.monitor, val))
            log.info("epoch %d: EMA val %s %.4f vs %.4f%s", epoch + 1, cfg.monitor, val_ema[cfg.monitor],
                     val[cfg.monitor], " (EMA kept)" if ema_wins else "")
            if ema_wins:
                val, weights = {**val_ema, "ema": True}, ema.module
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"],  # the head's
               "train_loss": loss_sum.item() / max(seen, 1),
               f"train_{task.running_metric}": running.item() / max(seen, 1), "val_loss": val["loss"],
               **{f"val_{k}": val[k] for k in task.headline},
               "train_samples_per_s": seen * accelerator.num_processes / epoch_seconds,
               "epoch_seconds": epoch_seconds}
        history.append(row)
        accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        score = _score(cfg.monitor, val)
        scheduler.step(epoch + 1, metric=val[cfg.monitor])  # epoch-based schedules (plateau); else a no-op
        improved = _better(score, best)
        log.info("epoch %d/%d  train loss %.4f %s %.4f  val loss %.4f %s  %.0f samples/s%s",
                 epoch + 1, cfg.epochs, row["train_loss"], task.running_metric,
                 row[f"train_{task.running_metric}"], val["loss"],
                 " ".join(f"{k} {val[k]:.4f}" for k in task.headline), row["train_samples_per_s"],
                 "  *best" if improved else "")
        if improved:
            best, best_epoch = score, epoch + 1
            on_best(epoch + 1, val, weights)
        if stopper.update(score):
            log.info("early stopping: no improvement of val %s by more than %g for %d epochs", cfg.monitor,
                     cfg.min_delta, stopper.stale)
            break
    best_value = history[best_epoch - 1][f"val_{cfg.monitor}"] if best_epoch > 0 else float("nan")
    return FitResult(history, best_epoch, best_value, stopped_early=len(history) < cfg.epochs,
                     train_seconds=train_seconds)


@torch.inference_mode()
def evaluate(accelerator: Accelerator, module: torch.nn.Module, loader: DataLoader, task, desc: str = "evaluate",
             quiet: bool = False, tta: str = "none") -> dict:
    """Metrics of `task` over `loader`, plus the mean unsmoothed loss."""
    module.eval()
    metrics = task.metrics().to(accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                     disable=quiet or not accelerator.is_local_main_process):
        logits = forward(module, x, tta)
        logits, y = accelerator.gather_for_metrics((logits, y))
        metrics.update(*task.for_metrics(logits, y))
        loss_sum += task.eval_loss(logits, y).sum()
        count += len(y)
    out = task.summarize(metrics.compute())
    out["loss"] = loss_sum.item() / max(count, 1)
    out["samples"] = count
    return out
