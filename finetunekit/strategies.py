"""Strategies: which parameters train, and which modules stay in inference mode while they do.

- full: every parameter trains.
- linear-probe: only the new head trains; the backbone is frozen *and* kept in eval mode, so BatchNorm
  running statistics and dropout inside the frozen part do not drift (a frozen backbone is a fixed
  feature extractor).
- freeze_layers=N (with full): the input side (embeddings, stem) and the first N blocks are frozen; the rest
  trains. Needs a backbone that names its blocks (transformers encoders do).
"""

from __future__ import annotations

from torch import nn

from .errors import UserError
from .models import Backbone

STRATEGIES = ("full", "linear-probe")


def apply_strategy(strategy: str, backbone: Backbone, freeze_layers: int | None = None) -> None:
    """Set requires_grad for `strategy`, then freeze the lowest `freeze_layers` blocks."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    for name, p in backbone.module.named_parameters():
        p.requires_grad_(strategy == "full" or backbone.is_head(name))
    if freeze_layers is not None:
        for name in frozen_by_depth(backbone, freeze_layers):
            backbone.module.get_parameter(name).requires_grad_(False)


def frozen_by_depth(backbone: Backbone, n: int) -> list[str]:
    """Parameters registered before block `n` of `backbone.blocks`: the embeddings and blocks 0..n-1."""
    if backbone.blocks is None:
        raise UserError(f"--freeze-layers: {backbone.source}:{backbone.architecture} does not name its "
                        f"layers; freezing by depth works for transformers encoders")
    blocks = backbone.module.get_submodule(backbone.blocks)
    if n > len(blocks):
        raise UserError(f"--freeze-layers {n}: the model has {len(blocks)} layers")
    prefix = backbone.blocks + "."
    frozen = []
    for name, _ in backbone.module.named_parameters():
        if backbone.is_head(name):
            continue
        if name.startswith(prefix):
            if int(name[len(prefix):].split(".", 1)[0]) >= n:
                break  # blocks n.. and whatever follows them (final norm, pooler) train
        frozen.append(name)
    return frozen


def set_train_mode(strategy: str, module: nn.Module, head: str, inner: nn.Module | None = None) -> None:
    """model.train(), except frozen parts under linear-probe, which stay in eval mode.

    `module` may be a distributed wrapper; `inner` is then the wrapped model, whose names `head` uses
    (comma-separated when the head is several modules).
    """
    module.train()
    if strategy == "linear-probe":
        heads = head.split(",")
        for name, m in (inner or module).named_modules():
            in_head = any(name == h or name.startswith(h + ".") for h in heads)
            above_head = any(h.startswith(name + ".") for h in heads)
            if name and not in_head and not above_head:
                m.eval()
