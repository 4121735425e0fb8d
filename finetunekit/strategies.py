"""Strategies: which parameters train, and which modules stay in inference mode while they do.

- full: every parameter trains.
- linear-probe: only the new head trains; the backbone is frozen *and* kept in eval mode, so BatchNorm
  running statistics and dropout inside the frozen part do not drift (a frozen backbone is a fixed
  feature extractor).
"""

from __future__ import annotations

from torch import nn

from .models import Backbone

STRATEGIES = ("full", "linear-probe")


def apply_strategy(strategy: str, backbone: Backbone) -> None:
    """Set requires_grad for `strategy`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    head = backbone.head_parameter_names()
    for name, p in backbone.module.named_parameters():
        p.requires_grad_(strategy == "full" or name in head)


def set_train_mode(strategy: str, module: nn.Module, head: str, inner: nn.Module | None = None) -> None:
    """model.train(), except frozen parts under linear-probe, which stay in eval mode.

    `module` may be a distributed wrapper; `inner` is then the wrapped model, whose names `head` uses.
    """
    module.train()
    if strategy == "linear-probe":
        for name, m in (inner or module).named_modules():
            if name and not (name == head or name.startswith(head + ".")) and not head.startswith(name + "."):
                m.eval()
