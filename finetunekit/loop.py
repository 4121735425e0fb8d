"""The one training loop. accelerate does devices, precision, accumulation and distribution.

Per batch, in this order: task.prepare (on the device), addons.train_batch, task.step (loss, size,
outputs), backward of the loss plus addons.extra_loss, and at an accumulation boundary: clip, optimizer
step (a non-finite update is skipped), scheduler, addons.after_update. After each epoch: evaluate the
trained weights and every addons.eval_candidates() (each through addons.eval_model), keep the best, early
stopping, checkpoint, addons.after_epoch (which may stop training: a search's pruner). The loop never looks
inside a batch or an output: the task does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from . import distributed, faults
from .errors import TrainingStopped
from .data.order import EpochBatches
from .addons.base import AddOns
from .evaluation import evaluate
from .progress import Progress
from .strategies import Plan, apply_phase, set_train_mode
from .tasks import LOWER_IS_BETTER

if TYPE_CHECKING:
    from .checkpoint import Checkpoints

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
    log_every: int = 25  # steps between progress updates and device-side skip checks (each one syncs)
    max_nonfinite: int = 10  # stop after this many updates in a row skipped for a non-finite loss/gradient


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint (as JSON) and all a resumed run needs besides tensors."""

    epoch: int = 0  # the epoch in progress (0-based); == epochs when done
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # batches trained in the whole run (names the checkpoints)
    updates: int = 0  # optimizer updates so far (skipped ones included when skipped on the device: see fit)
    skipped: int = 0  # updates skipped because the loss or a gradient was not finite
    best: list[float] | None = None  # the best _score so far
    best_epoch: int = -1
    best_val: dict = field(default_factory=dict)  # validation metrics of the saved (best) weights
    stop_reference: list[float] | None = None  # EarlyStopping state
    stop_stale: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0  # the epoch in progress so far: summed loss, running metric, samples, seconds
    running: float = 0.0
    seen: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0
    grad_norm_sum: float = 0.0  # the epoch in progress: its updates' finite gradient norms (before clipping),
    grad_norms: float = 0.0  # summed, and how many

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


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


def _better(score: tuple[float, float], best: tuple[float, float] | None) -> bool:
    if not all(math.isfinite(s) for s in score):
        return False  # a NaN/Inf metric is never "best"
    return best is None or score > best


def fit(accelerator: Accelerator, module: torch.nn.Module, optimizer, scheduler, train_loader: DataLoader,
        val_loader: DataLoader, task, cfg: LoopConfig, on_best: Callable[[int, dict, torch.nn.Module], None],
        state: TrainState | None = None, checkpoints: Checkpoints | None = None,
        addons: AddOns | None = None, features: tuple | None = None,
        on_epoch: Callable[[TrainState], None] | None = None) -> TrainState:
    """Train to `cfg.epochs` from `state` (a fresh run, or one restored from a checkpoint), evaluate after
    each epoch, call `on_best(epoch, val, weights)` on improvement (`weights`: the trained module, or an
    add-on's candidate, e.g. its EMA, when that scored better). With `checkpoints`, a checkpoint is written at its period (only at an
    update boundary, never inside an accumulation window), after each epoch, and on SIGTERM/SIGINT.

    An update whose loss or gradient is not finite is skipped. With torch's fused Adam/AdamW (the default
    on GPUs) the skip happens on the device, without a host sync per update: the flag is checked every
    `cfg.log_every` batches, before a checkpoint and at the end of an epoch, so the warnings come in bursts
    and `cfg.max_nonfinite` skips in a row stop the run up to `log_every` batches later than they occur. A
    skipped update still counts in `state.updates`: the lr schedule moves on by one update (as after fp16's
    GradScaler skips a step) and add-ons' after_update runs (the EMA steps towards the unchanged weights). Other optimizers
    check each update's gradient norm on the host and neither count nor schedule a skipped update.

    `features` = (head, train loader, validation loader) over cached backbone features: the phases marked
    `on_features` (head-only phases before any other) train and validate the head on them; the head's
    parameters are the model's own, so the optimizer, the checkpoints and `on_best` see the whole model.

    `on_epoch(state)`: after each epoch's row, best and checkpoint (the run's history.csv and progress.json)."""
    state = state or TrainState()
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    stopper.reference = tuple(state.stop_reference) if state.stop_reference else None
    stopper.stale = state.stop_stale
    inner = accelerator.unwrap_model(module, keep_torch_compile=False)  # the model itself, also under --compile
    addons = addons if addons is not None else AddOns()
    addons.start(inner)
    if checkpoints is not None and checkpoints.addon_tensors:
        addons.load_state_dict(checkpoints.addon_tensors)
    skips = _Skips(cfg.max_nonfinite)
    on_device = _skips_on_device(accelerator, optimizer)
    model, images_transform = module, task.input_transform
    phase = None
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch
        if cfg.plan.phase_at(epoch) is not phase:
            phase = cfg.plan.phase_at(epoch)
            apply_phase(phase, inner, optimizer)
            model = distributed.for_phase(accelerator, model)  # DDP: a reducer over exactly the trainable ones
            cached = phase.on_features and features is not None
            module, batches, validation = features if cached else (model, train_loader, val_loader)
            task.input_transform = None if cached else images_transform  # feature vectors are not images
            sampler = _epoch_batches(batches)
            params = [p for p in module.parameters() if p.requires_grad]
            if epoch > 0 or len(cfg.plan.phases) > 1:
                log.info("epoch %d: training %s; %d tensors, lr x%g%s", epoch + 1, phase.description, len(params),
                         phase.lr_mult, ", on cached features" if cached else "")
        set_train_mode(module, inner if module is model else None)
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)  # accelerate's loader: its own count (it forwards it to ours on one process)
        if sampler is not None:  # ours, directly: accelerate's BatchSamplerShard (2+ processes) does not forward it
            sampler.set_epoch(epoch)
        if state.batch:
            sampler.skip(state.batch * accelerator.num_processes)  # each process trains every N-th batch
            log.info("resuming epoch %d at batch %d", epoch + 1, state.batch + 1)
        device = accelerator.device
        loss_sum = torch.tensor(state.loss_sum, device=device)
        running = torch.tensor(state.running, device=device)  # task.running_metric, summed over samples
        norms = torch.tensor([state.grad_norm_sum, state.grad_norms], device=device)  # finite norms: sum, count
        losses: list[torch.Tensor] = []  # per batch, for steps.csv (fetched from the device at checkpoints)
        start = time.perf_counter() - state.epoch_seconds
        # a bar on a terminal; piped: a line every few minutes (progress.py)
        bar = Progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=state.batch,
                       total=len(batches) if hasattr(batches, "__len__") else None, every=cfg.log_every,
                       quiet=cfg.quiet, disable=not accelerator.is_local_main_process)
        for batch in bar:
            batch = task.prepare(batch)
            with accelerator.accumulate(module):
                trained = addons.train_batch(batch, epoch)  # MixUp: mixed inputs, soft targets
                loss, size, outputs = task.step(module, trained)  # logged as the train loss
                accelerator.backward(addons.extra_loss(loss, trained, outputs))  # + an L1 penalty, if any
                faults.point("batch")
                update = accelerator.sync_gradients
                if update and on_device:  # stepped, or skipped by the kernel: known at the next skips.check
                    flag, norm = _step_unless_nonfinite(accelerator, optimizer, params, cfg.clip_grad)
                    skips.queue(state.step + 1, flag)
                    ok = (flag == 0).float()  # the norm of a skipped update is not finite: left out
                    norms += torch.stack([torch.where(flag > 0, 0.0, norm.float().to(device)), ok])
                    optimizer.zero_grad(set_to_none=True)
                    state.updates += 1
                    scheduler.step_update(num_updates=state.updates)
                    addons.after_update(inner, state.updates)
                elif update:
                    norm = _clipped_norm(accelerator, params, cfg.clip_grad)
                    if not bool(torch.isfinite(norm)):
                        optimizer.zero_grad(set_to_none=True)  # the update is skipped: the weights never see it
                        skips.record(state, state.step + 1, True)
                        update = False
                    else:
                        skips.record(state, state.step + 1, False)
                        norms += torch.stack([norm.float().to(device), torch.ones((), device=device)])
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        state.updates += 1
                        scheduler.step_update(num_updates=state.updates)
                        addons.after_update(inner, state.updates)
            loss_sum += loss.detach() * size
            running += task.running(outputs, batch)
            state.seen += size
            state.batch += 1
            state.step += 1
            losses.append(loss.detach())
            if state.batch % cfg.log_every == 0:
                skips.check(state)
            if bar.due(state.batch):
                bar.show({"loss": f"{loss_sum.item() / state.seen:.4f}",
                          task.running_metric: f"{running.item() / state.seen:.3f}",
                          "samples/s": f"{state.seen / max(time.perf_counter() - start, 1e-9):.0f}"}, state.batch)
            if update:
                faults.point("update")
            if update and checkpoints is not None and checkpoints.due(state.updates):
                skips.check(state)
                state.loss_sum, state.running = loss_sum.item(), running.item()
                state.grad_norm_sum, state.grad_norms = norms.tolist()
                state.epoch_seconds = time.perf_counter() - start
                path = checkpoints.save(_totals(accelerator, state), inner, optimizer, scheduler, addons.state_dict(),
                                        _flush(losses, state.step))
                if checkpoints.stop_requested:
                    raise checkpoints.stopped(path)
        bar.close()
        skips.check(state)
        epoch_seconds = time.perf_counter() - start
        state.train_seconds += epoch_seconds  # includes the seconds before a resume (state.epoch_seconds)
        val, weights = _validate(accelerator, module, inner, addons, validation, task, cfg, epoch)
        summed = _totals(accelerator, dataclasses.replace(state, loss_sum=loss_sum.item(), running=running.item()))
        seen = summed.seen  # over every process
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"],  # the head's
               "train_loss": summed.loss_sum / max(seen, 1),
               f"train_{task.running_metric}": summed.running / max(seen, 1), "val_loss": val["loss"],
               **{f"val_{k}": val[k] for k in task.headline},
               "grad_norm": norms[0].item() / max(norms[1].item(), 1.0),  # mean over its updates, before clipping
               "train_samples_per_s": seen / epoch_seconds,
               "epoch_seconds": epoch_seconds}
        state.history.append(row)
        accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        score = _score(cfg.monitor, val)
        scheduler.step(epoch + 1, metric=val[cfg.monitor])  # epoch-based schedules (plateau); else a no-op
        improved = _better(score, tuple(state.best) if state.best else None)
        log.info("epoch %d/%d  train loss %.4f %s %.4f  val loss %.4f %s  %.0f samples/s%s",
                 epoch + 1, cfg.epochs, row["train_loss"], task.running_metric,
                 row[f"train_{task.running_metric}"], val["loss"],
                 " ".join(f"{k} {val[k]:.4f}" for k in task.headline), row["train_samples_per_s"],
                 "  *best" if improved else "")
        if improved:
            state.best, state.best_epoch, state.best_val = list(score), epoch + 1, dict(val)
            on_best(epoch + 1, val, weights)
        faults.point("after-eval")
        if stopper.update(score):
            log.info("early stopping: no improvement of val %s by more than %g for %d epoch%s", cfg.monitor,
                     cfg.min_delta, stopper.stale, "" if stopper.stale == 1 else "s")
            state.stopped_early = True
        state.stop_reference = list(stopper.reference) if stopper.reference else None
        state.stop_stale = stopper.stale
        state.epoch, state.batch, state.seen = epoch + 1, 0, 0
        state.loss_sum = state.running = state.epoch_seconds = state.grad_norm_sum = state.grad_norms = 0.0
        if checkpoints is not None:
            path = checkpoints.save(state, inner, optimizer, scheduler, addons.state_dict(),
                                    _flush(losses, state.step), best=improved)
        if on_epoch is not None:
            on_epoch(state)
        if checkpoints is not None and checkpoints.stop_requested and state.epoch < cfg.epochs:
            raise checkpoints.stopped(path)
        if addons.after_epoch(state.epoch, val) and state.epoch < cfg.epochs:  # a search's pruner
            log.info("training stopped after epoch %d by an add-on", state.epoch)
            break
    task.input_transform = images_transform
    return state


def _totals(accelerator: Accelerator, state: TrainState) -> TrainState:
    """`state` with the epoch's running sums (loss, running metric, samples) summed over every process: what a
    checkpoint saves (a resumed run's other processes start theirs at 0: resume.restore) and the epoch reports.
    One process: `state` itself."""
    if accelerator.num_processes == 1:
        return state
    sums = torch.tensor([state.loss_sum, state.running, float(state.seen)], dtype=torch.float64,
                        device=accelerator.device)
    loss_sum, running, seen = accelerator.reduce(sums, "sum").tolist()
    return dataclasses.replace(state, loss_sum=loss_sum, running=running, seen=int(round(seen)))


def _validate(accelerator: Accelerator, module, inner, addons: AddOns, loader, task, cfg: LoopConfig, epoch: int):
    """Validation metrics of the trained weights and of each add-on candidate (the EMA); the best one's
    metrics and weights (`inner`, the unwrapped model, when the trained weights win)."""
    val = evaluate(accelerator, addons.eval_model(module), loader, task, desc="validate", quiet=cfg.quiet)
    weights = inner
    for name, candidate in addons.eval_candidates():
        val_c = evaluate(accelerator, addons.eval_model(candidate), loader, task, desc=f"validate {name}",
                         quiet=cfg.quiet)
        wins = _better(_score(cfg.monitor, val_c), _score(cfg.monitor, val))
        log.info("epoch %d: %s val %s %.4f vs %.4f%s", epoch + 1, name, cfg.monitor, val_c[cfg.monitor],
                 val[cfg.monitor], f" ({name} kept)" if wins else "")
        if wins:
            val, weights = {**val_c, name.lower(): True}, candidate
    return val, weights


def _epoch_batches(loader):
    """Our EpochBatches under whatever accelerate wrapped around the loader."""
    sampler = getattr(loader, "batch_sampler", None)
    while sampler is not None and not isinstance(sampler, EpochBatches):
        sampler = getattr(sampler, "batch_sampler", None)
    return sampler


def _clipped_norm(accelerator: Accelerator, params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """Clip the gradients (when asked); their total norm before clipping. fp16's gradient scaler skips
    overflowing steps itself (and lowers its scale), so with one the norm is reported as finite (0)."""
    if accelerator.scaler is not None:
        if clip:
            accelerator.clip_grad_norm_(params, clip)
        return torch.zeros(())
    return accelerator.clip_grad_norm_(params, clip or float("inf"))


def _base_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _skips_on_device(accelerator: Accelerator, optimizer) -> bool:
    """Whether a non-finite update can be skipped on the device: torch's fused Adam/AdamW read
    `optimizer.found_inf` (the AMP protocol, `_step_supports_amp_scaling`) and, when it is 1, leave weights
    and moments untouched and take back the step count. Not under fp16's GradScaler (it sets found_inf
    itself), nor for other optimizers: fused SGD, for one, leaves the momentum buffers it allocates on its
    first step uninitialised when that step is skipped."""
    inner = _base_optimizer(optimizer)
    return (accelerator.scaler is None and isinstance(inner, torch.optim.Adam)
            and getattr(inner, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in inner.param_groups))


def _step_unless_nonfinite(accelerator: Accelerator, optimizer, params: list[torch.Tensor],
                           clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients (when asked) and step; the fused kernel skips the update when their norm is not
    finite. Returns that flag (1.0 = skipped, a 0-d float32 tensor left on the device: no sync) and the norm."""
    norm = accelerator.clip_grad_norm_(params, clip or float("inf"))  # a CPU 0.0 when no gradient at all
    found_inf = (~torch.isfinite(norm)).float().to(accelerator.device)
    inner = _base_optimizer(optimizer)
    inner.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del inner.found_inf  # as GradScaler does: nothing is left for a later step to read
    return found_inf, norm


class _Skips:
    """Updates skipped for a non-finite loss or gradient: counted in `state.skipped`, each logged, and
    `limit` in a row stop the run. Updates skipped on the device are queued with their flag (a device
    tensor) and counted at `check`, where the loop syncs anyway."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, flag) not yet fetched

    def queue(self, step: int, flag: torch.Tensor) -> None:
        self.pending.append((step, flag))

    def check(self, state: TrainState) -> None:
        if self.pending:
            flags = torch.stack([f for _, f in self.pending]).tolist()  # one sync for all of them
            steps = [s for s, _ in self.pending]
            self.pending.clear()
            for step, flag in zip(steps, flags):
                self.record(state, step, flag > 0)

    def record(self, state: TrainState, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        state.skipped += 1
        self.in_a_row += 1
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"{self.in_a_row} updates in a row had a non-finite loss or gradient; likely causes: a learning "
                f"rate too high (try a lower --lr or `finetunekit lr-find`), fp16 overflow (try --precision bf16 "
                f"or no), or bad labels/targets")


def _flush(losses: list[torch.Tensor], last_step: int) -> list[tuple[int, float]]:
    """(global step, loss) of the batches since the last flush; empties `losses`."""
    values = torch.stack(losses).float().cpu().tolist() if losses else []
    losses.clear()
    return list(zip(range(last_step - len(values) + 1, last_step + 1), values))
