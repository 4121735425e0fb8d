"""The add-on contract: a plain object with named hooks, which the loop calls in a fixed order.

    wrap_model(module) -> module         once, before the model is prepared for the device (QAT, LoRA,
                                         gradient checkpointing)
    start(model)                         once, when training starts (after a resume: before load_state_dict)
    train_batch(batch, epoch) -> batch   each training batch, after task.prepare (MixUp/CutMix; distillation
                                         takes off the cached teacher logits a batch may carry after (x, y))
    train_loss(loss, batch, outputs) -> tensor   the loss to back-propagate in place of the task's, never
                                         logged (distillation: (1 - alpha) * loss + alpha * its soft loss)
    extra_loss(batch, outputs) -> tensor | None   added to the task's loss for backward, never logged (L1)
    after_update(model, updates)         after each optimizer update (EMA)
    eval_model(model) -> model           the model to evaluate and predict with (TTA)
    eval_candidates() -> [(name, module)]  other weights to evaluate after each epoch; the best is saved (EMA)
    after_epoch(epoch, val) -> bool      after each epoch's validation and checkpoint; True stops training there
                                         (a search trial's pruner: finetunekit/search/trial_addon.py)
    model_config() -> dict               entries saved in the model folder's config (TTA)
    state_dict() / load_state_dict(d)    tensors for checkpoints, by file name ({"ema.safetensors": {...}})
    finish(best, folder, score) -> dict  once, after training: turn the best model into another form, score
                                         it and write it into the model folder; entries for metrics.json (QAT)

`train_loss` exists because distillation does not add a term but re-weighs the task's loss against its
own; `extra_loss` cannot, as it never sees the task's loss. Each add-on's `train_loss` applies in order, then
every `extra_loss` is added; the loop logs the task's loss as `task.step` returned it.

A batch may carry per-sample data after (x, y) that a build stage attached to the training loader
(finetunekit/teacher.py: the teacher's cached logits): the task's `prepare` passes it through, and the add-on
that asked for it takes it off in `train_batch`, before `task.step` sees the batch.

`finish` exists because QAT's product is not the trained weights but a model converted from the best of
them, judged on the validation set: no per-epoch hook sees the best weights once, with the data to score
them. `best()` loads and returns the whole model with the saved best weights (called only by an add-on
that needs it); `folder` is the model folder (None on processes other than the main one); `score(module)`
is the validation metrics of `module`, as the loop computes them.

Every hook has a default that does nothing, so an add-on defines only the hooks it needs. Hooks run in
the order the add-ons were built (build.addons), each receiving what the previous one returned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class AddOn:
    name = "addon"

    def wrap_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def start(self, model: torch.nn.Module) -> None:
        pass

    def train_batch(self, batch: Any, epoch: int) -> Any:
        return batch

    def train_loss(self, loss: torch.Tensor, batch: Any, outputs: Any) -> torch.Tensor:
        return loss

    def extra_loss(self, batch: Any, outputs: Any) -> torch.Tensor | None:
        return None

    def after_update(self, model: torch.nn.Module, updates: int) -> None:
        pass

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def eval_candidates(self) -> list[tuple[str, torch.nn.Module]]:
        return []

    def after_epoch(self, epoch: int, val: dict[str, Any]) -> bool:
        return False

    def model_config(self) -> dict[str, Any]:
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """What the add-on reads besides the training data, as digests in the checkpoint's fingerprint: a resume
        whose add-on reads something else is stopped by the drift guard (resume.py)."""
        return {}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def load_state_dict(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        pass

    def finish(self, best: Callable[[], torch.nn.Module], folder: Path | None,
               score: Callable[[torch.nn.Module], dict]) -> dict[str, Any]:
        return {}


class AddOns(list):
    """The run's add-ons, with each hook applied across all of them in order."""

    def wrap_model(self, module):
        for a in self:
            module = a.wrap_model(module)
        return module

    def start(self, model) -> None:
        for a in self:
            a.start(model)

    def train_batch(self, batch, epoch: int):
        for a in self:
            batch = a.train_batch(batch, epoch)
        return batch

    def extra_loss(self, loss: torch.Tensor, batch, outputs) -> torch.Tensor:
        """What is back-propagated: `loss` as each add-on's train_loss turns it (distillation's weighted mix),
        plus every add-on's extra term."""
        for a in self:
            loss = a.train_loss(loss, batch, outputs)
        for a in self:
            extra = a.extra_loss(batch, outputs)
            if extra is not None:
                loss = loss + extra
        return loss

    def after_update(self, model, updates: int) -> None:
        for a in self:
            a.after_update(model, updates)

    def eval_model(self, model):
        for a in self:
            model = a.eval_model(model)
        return model

    def eval_candidates(self) -> list[tuple[str, torch.nn.Module]]:
        return [c for a in self for c in a.eval_candidates()]

    def after_epoch(self, epoch: int, val: dict[str, Any]) -> bool:
        """Whether an add-on stops training after this epoch (each one is asked: every hook runs)."""
        return any([a.after_epoch(epoch, val) for a in self])

    def model_config(self) -> dict[str, Any]:
        return {k: v for a in self for k, v in a.model_config().items()}

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for a in self for k, v in a.fingerprint().items()}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: v for a in self for k, v in a.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        for a in self:
            a.load_state_dict(tensors)

    def finish(self, best, folder, score) -> dict[str, Any]:
        return {k: v for a in self for k, v in a.finish(best, folder, score).items()}
