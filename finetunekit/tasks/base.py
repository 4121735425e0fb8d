"""The Task contract, and its implementation for tasks whose model returns logits.

The loop knows a task only through these methods (it never unpacks a batch and never assumes logits):

    prepare(batch) -> batch               on the device, before anything reads it (training and evaluation)
    step(model, batch) -> Step            training: the loss to back-propagate, the batch size, the outputs
    running(outputs, batch) -> tensor     a cheap training figure, summed over the batch (`running_metric`)
    eval_outputs(model, batch)            evaluation: (outputs, targets), gathered across processes
    gather_objects: bool                  (optional) outputs and targets are per-sample lists of different sizes:
                                          gathered as pickled pairs (detection), not by all_gather
    metrics() / update(metrics, outputs, targets) -> (loss sum, count) / summarize(computed)
    predict(outputs, top_k) -> [dict]     one result per sample, as `predict` prints it

and names `headline` (metrics in the log), `default_monitor`, `running_metric`, `kind`, and `decoded_cache`
(whether its image batches may come from the decoded-image cache). A task owns how its
batches look: detection would take lists of images and target dicts and return the detector's loss dict.

`LogitsTask` is that contract for batches `(x, y)` — x an image tensor [B, C, H, W] or a dict of
token tensors; a training batch may carry more after them, which `prepare` passes through for the add-on that
attached it (addons/base.py) — and a model whose output is logits [B, num_outputs] (or a transformers ModelOutput with
`.logits`). Subclasses give the loss and the metrics: classification, multi-label, regression.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch


class Step(NamedTuple):
    loss: torch.Tensor  # the task's training loss (what is logged as the train loss)
    batch_size: int
    outputs: Any  # what the model returned, detached or not (the loop detaches what it keeps)


def logits_of(module: torch.nn.Module, x: Any) -> torch.Tensor:
    """Logits [B, num_outputs] of a batch's inputs: a tensor (images) or a dict of tensors (tokenized text)."""
    out = module(**x) if isinstance(x, Mapping) else module(x)
    return getattr(out, "logits", out)  # transformers models return a ModelOutput


class LogitsTask:
    """Batches are (inputs, targets); the model gives logits. Subclasses define loss, eval_loss, running,
    for_metrics, metrics, summarize and predict on logits."""

    # batches -> the model's input, on the device; set by the build stage when the loader hands over
    # something else (the decoded-image cache's uint8 pixels: data.decoded.Normalize)
    input_transform: Callable | None = None
    class_weights: torch.Tensor | None = None  # per-class loss weights, where the task takes them
    decoded_cache = True  # its image batches can come from the decoded-image cache (data.decoded)

    def prepare(self, batch) -> tuple:
        x, y, *extra = batch  # extra: per-sample data an add-on attached (distillation's cached teacher logits)
        return (self.input_transform(x) if self.input_transform is not None else x, y, *extra)

    def step(self, model: torch.nn.Module, batch) -> Step:
        x, y = batch
        logits = logits_of(model, x)  # [B, num_outputs]
        return Step(self.loss(logits, y), len(y), logits)

    def running(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        return self.running_on(outputs.detach(), batch[1])

    def eval_outputs(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_of(model, batch[0]), batch[1]

    def update(self, metrics, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Add a batch to `metrics`; returns its summed plain loss and its size."""
        metrics.update(*self.for_metrics(outputs, targets))
        return self.eval_loss(outputs, targets).sum(), len(targets)
