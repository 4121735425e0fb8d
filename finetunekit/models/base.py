"""The Backbone contract: what every model source answers, whatever the library behind it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..data.transforms import Preprocessing


@dataclass
class Backbone:
    """A network whose head outputs `num_outputs` logits, and how to feed and rebuild it.

    `module` is the source library's own model (a timm or torchvision `nn.Module`), so its state dict
    keeps the library's names and loads back with that library alone.
    """

    module: nn.Module
    source: str  # "timm" | "torchvision"
    architecture: str  # the source's model name, e.g. "tf_efficientnet_lite0"
    head: str  # dotted name of the head (classifier) module inside `module`
    preprocessing: Preprocessing
    num_features: int  # width of the features the head reads

    def head_parameter_names(self) -> set[str]:
        return {f"{self.head}.{n}" for n, _ in self.module.get_submodule(self.head).named_parameters()}

    def head_module(self) -> nn.Module:
        return self.module.get_submodule(self.head)
