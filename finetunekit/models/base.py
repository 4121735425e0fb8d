"""The Backbone contract: what every model source answers, whatever the library behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..data.transforms import Preprocessing


@dataclass
class Backbone:
    """A network whose head outputs `num_outputs` logits, and how to feed and rebuild it.

    `module` is the source library's own model (a timm, torchvision or transformers `nn.Module`), so its
    state dict keeps the library's names and loads back with that library alone.
    """

    module: nn.Module
    source: str  # "timm" | "torchvision" | "hf"
    architecture: str  # the source's model name, e.g. "tf_efficientnet_lite0", "BertForSequenceClassification"
    head: str  # dotted name of the head module; comma-separated when it is several (DistilBERT)
    preprocessing: Preprocessing | None  # images: size, mean, std, crop
    num_features: int  # width of the features the head reads
    tokenizer: Any = None  # text: the model's tokenizer
    blocks: str | None = None  # dotted name of the ModuleList of blocks/layers, input to output, if known

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(self.head.split(","))

    def is_head(self, name: str) -> bool:
        """Whether a parameter, buffer or module `name` belongs to the head."""
        return any(name == h or name.startswith(h + ".") for h in self.heads)

    def head_parameter_names(self) -> set[str]:
        return {n for n, _ in self.module.named_parameters() if self.is_head(n)}
