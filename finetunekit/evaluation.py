"""One evaluation pass: a task's metrics over a loader, plus the mean plain (unsmoothed) loss.

Used by the loop after each epoch, by `evaluate` on a saved model, and for the test set; it needs only the
task contract (tasks/base.py), never the training loop.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from .progress import Progress


class Outputs:
    """A split's gathered outputs and targets, batch by batch, on the CPU: tensors (logits [N, C], targets) or,
    for tasks that gather objects (detection), lists of per-sample dicts."""

    def __init__(self):
        self.outputs: list = []
        self.targets: list = []

    def add(self, outputs, targets) -> None:
        self.outputs.append(send_to_device(outputs, "cpu"))
        self.targets.append(send_to_device(targets, "cpu"))

    def joined(self) -> tuple:
        if self.outputs and isinstance(self.outputs[0], torch.Tensor):
            return torch.cat(self.outputs), torch.cat(self.targets)
        return [o for batch in self.outputs for o in batch], [t for batch in self.targets for t in batch]


@torch.inference_mode()
def evaluate(accelerator: Accelerator, module: torch.nn.Module, loader: DataLoader, task, desc: str = "evaluate",
             quiet: bool = False, keep: Outputs | None = None) -> dict:
    """Metrics of `task` over `loader` (`module`: the model to score, e.g. wrapped for test-time
    augmentation), plus "loss" (the mean plain loss) and "samples". `keep`: collects the gathered outputs and
    targets on the CPU, in loader order (calibration and the predictions files: posthoc.py)."""
    module.eval()
    metrics = task.metrics().to(accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = 0
    passes = Progress(loader, desc=desc, total=len(loader) if hasattr(loader, "__len__") else None, quiet=quiet,
                      disable=not accelerator.is_local_main_process)
    for batch in passes:
        outputs, targets = task.eval_outputs(module, task.prepare(batch))
        if getattr(task, "gather_objects", False):  # per-sample outputs of different sizes (detections)
            pairs = accelerator.gather_for_metrics(list(zip(outputs, targets)), use_gather_object=True)
            outputs, targets = send_to_device(([o for o, _ in pairs], [t for _, t in pairs]), accelerator.device)
        else:
            outputs, targets = accelerator.gather_for_metrics((outputs, targets))
        if keep is not None:
            keep.add(outputs, targets)
        batch_loss, n = task.update(metrics, outputs, targets)
        loss_sum += batch_loss
        count += n
        if passes.due(passes.count + 1):
            passes.show()
    passes.close()
    out = task.summarize(metrics.compute())
    out["loss"] = loss_sum.item() / max(count, 1)
    out["samples"] = count
    return out
