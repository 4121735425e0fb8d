"""Heads: the default linear classifier a source provides, or an MLP in its place (`--head mlp:N`).

The MLP replaces the module at `backbone.head`, so the head keeps its name (strategies, layer groups and
weight loading see it as the head). A folder with an MLP head records it in config.json
(finetunekit.head_type) and loads with `finetunekit.load` only: plain timm and torchvision build their
linear head, and refuse the MLP's tensors (head.1.weight, head.4.weight, ...) as unexpected keys.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import UserError
from .base import Backbone

_MLP = re.compile(r"mlp:([1-9][0-9]*)")


def check_head(spec: str) -> None:
    if spec != "linear" and not _MLP.fullmatch(spec):
        raise UserError(f"--head {spec}: expected linear or mlp:N (N hidden units, e.g. mlp:256)")


def mlp(in_features: int, hidden: int, out_features: int, dropout: float) -> nn.Sequential:
    """[B, in] -> Dropout -> Linear(hidden) -> GELU -> Dropout -> Linear(out)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))


def apply_head(backbone: Backbone, spec: str, dropout: float | None) -> None:
    """Replace the linear head by an MLP when `spec` is mlp:N (same number of outputs)."""
    check_head(spec)
    if spec == "linear":
        return
    if not backbone.adapter.mlp_head:
        raise UserError("--head mlp: transformers models keep their own classification head; use --head linear")
    linear = backbone.module.get_submodule(backbone.head)
    if not isinstance(linear, nn.Linear):
        raise UserError(f"--head {spec}: {backbone.architecture}'s head is not a linear layer")
    hidden = int(_MLP.fullmatch(spec).group(1))
    backbone.module.set_submodule(backbone.head, mlp(linear.in_features, hidden, linear.out_features, dropout or 0.0))
