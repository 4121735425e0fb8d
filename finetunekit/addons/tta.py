"""Test-time augmentation for images: validation, test and predict average the logits over views of each
batch. Saved in the model folder's config, so `finetunekit.load` predicts the same way."""

from __future__ import annotations

import torch

from .base import AddOn

MODES = ("none", "flip", "crops", "flip-crops")


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """Views of an image batch [B, C, H, W]: the batch itself; 'flip' adds its mirror; 'crops' adds the
    centre and the four corner crops of 7/8 of each side, resized back to H x W; 'flip-crops' adds both."""
    views = [x]
    if tta in ("flip", "flip-crops"):
        views.append(x.flip(-1))
    if tta in ("crops", "flip-crops"):
        h, w = x.shape[-2:]
        ch, cw = round(h * 7 / 8), round(w * 7 / 8)
        for top, left in ((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw):
            crop = x[..., top:top + ch, left:left + cw]
            views.append(torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return views


class TTAModel(torch.nn.Module):
    """`module`'s logits averaged over the views of `tta_views` (a wrapper for evaluation only: it owns
    no weights of its own, so state dicts and saving go through the module itself)."""

    def __init__(self, module: torch.nn.Module, mode: str):
        super().__init__()
        self.module, self.mode = module, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = tta_views(x, self.mode)
        return sum(_logits(self.module(v)) for v in views) / len(views)


def _logits(out):
    return getattr(out, "logits", out)  # transformers models return a ModelOutput


def with_tta(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    return module if mode == "none" else TTAModel(module, mode)


class TTA(AddOn):
    name = "tta"

    def __init__(self, mode: str):
        self.mode = mode

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return with_tta(model, self.mode)

    def model_config(self) -> dict:
        return {"tta": self.mode}
