"""`--prune R`: structured channel pruning of an image CNN with torch-pruning, before fine-tuning.

Unstructured magnitude pruning (`torch.nn.utils.prune`) zeroes weights in tensors that keep their shapes,
so neither latency nor file size changes (pytorch/pytorch#36214). This removes whole channels instead:
torch-pruning's DependencyGraph finds everything coupled to a channel (a convolution's output, its
BatchNorm, the next layer's input, a depthwise convolution's input and output together, the branches of a
residual addition) and removes them as one group; GroupMagnitudeImportance ranks a group's channels by the
L2 norm of all their weights, and the lowest R of each group's channels go. The head is an ignored layer:
its outputs (the classes) stay, its inputs shrink with the last convolution.

It runs on the pretrained model with its new head, before the optimizer is built, so the run's epochs
fine-tune the pruned model to recover. The new sizes are recorded on the Backbone (`pruned_layers`) and
saved in the model folder, whose loader resizes the freshly built architecture before the weights load
(models/pruned.py). `--resume` prunes the freshly built model again: the importance is a function of the
pretrained weights and the seeded head alone, so the sizes come out the same; the checkpoint's fingerprint
holds their digest, and a mismatch is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .fastpath import is_cnn
from .models import pruned


@dataclass(frozen=True)
class Pruned:
    ratio: float
    params: tuple[int, int]  # before, after
    macs: tuple[int, int]  # multiply-accumulates of one image at `size`, before, after
    size: int
    layers: int  # layers resized

    def line(self) -> str:
        (p0, p1), (m0, m1) = self.params, self.macs
        return (f"--prune {self.ratio:g}: {self.ratio:.0%} of the channels of each layer group removed (torch-pruning, "
                f"group magnitude importance; {self.layers} layers resized): {p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M "
                f"parameters ({p1 / p0:.0%}), {m0 / 1e6:.1f}M -> {m1 / 1e6:.1f}M MACs at {self.size} px "
                f"({m1 / m0:.0%}); the run's epochs fine-tune it to recover")


def count(module: nn.Module, size: int) -> tuple[int, int]:
    """(MACs of one `size` x `size` image, parameters), by torch-pruning's counter."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, torch.zeros(1, 3, size, size))
    return int(macs), int(params)


def prune(backbone, ratio: float, size: int) -> Pruned:
    """Remove `ratio` of the channels of each of `backbone`'s layer groups, in place; the head's outputs kept."""
    import torch_pruning as tp

    module = backbone.module
    if not is_cnn(module):
        raise UserError(f"--prune {ratio:g}: {backbone.source}:{backbone.architecture} is not a CNN (channel "
                        f"pruning here is for convolutional networks)")
    training = module.training
    module.eval()  # the graph is traced with forward passes: BatchNorm statistics must not move
    example = torch.zeros(1, 3, size, size)  # zeros: no draw from the seeded random stream
    macs0, params0 = count(module, size)
    sizes0, tensors0 = pruned.layer_sizes(module), pruned.tensor_shapes(module)
    head = [m for n, m in module.named_modules() if backbone.is_head(n) and pruned._attrs(m) is not None]
    pruner = tp.pruner.MetaPruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=head)
    pruner.step()
    layers, others = pruned.changed(sizes0, tensors0, module)
    if others:
        raise UserError(f"--prune {ratio:g}: pruning {backbone.architecture} changes tensors outside convolution, "
                        f"BatchNorm and Linear layers ({', '.join(others[:2])}), which a saved model could not "
                        f"rebuild")
    with torch.no_grad():
        module(example)  # the pruned graph still runs
    module.train(training)
    backbone.pruned_layers = layers
    width = _head_input(module, backbone)
    if width is not None:
        backbone.num_features = width
        if isinstance(getattr(module, "num_features", None), int):
            module.num_features = width  # timm's reset_classifier reads it
    macs1, params1 = count(module, size)
    return Pruned(ratio, (params0, params1), (macs0, macs1), size, len(layers))


def _head_input(module: nn.Module, backbone) -> int | None:
    """The width of the features the head reads (its first Linear's inputs)."""
    for name, m in module.named_modules():
        if backbone.is_head(name) and isinstance(m, nn.Linear):
            return m.in_features
    return None


def digest(layers: dict) -> str | None:
    """A short fingerprint of the pruned sizes (None when not pruned), for resume's drift guard."""
    if not layers:
        return None
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]
