"""EMA of the weights (timm's ModelEmaV3, decay warming up over the first updates): evaluated after every
epoch beside the trained weights, and saved when it scores better."""

from __future__ import annotations

import torch

from .base import AddOn

FILE = "ema.safetensors"  # its tensors in a checkpoint


class EMA(AddOn):
    name = "ema"

    def __init__(self, decay: float):
        self.decay = decay
        self.ema = None
        self._restored: dict[str, torch.Tensor] | None = None

    def start(self, model: torch.nn.Module) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=True)

    def after_update(self, model: torch.nn.Module, updates: int) -> None:
        self.ema.update(model, step=updates)

    def eval_candidates(self) -> list[tuple[str, torch.nn.Module]]:
        return [("EMA", self.ema.module)]

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {FILE: self.ema.module.state_dict()}

    def load_state_dict(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        if FILE in tensors:
            self.ema.module.load_state_dict(tensors[FILE])
