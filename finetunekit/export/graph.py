"""What the ONNX and TorchScript exporters trace: the model as a function of plain tensors to logits, and the
real validation inputs (as the runtime will feed them) that the parity gate runs it on.

Images: one input `pixels`, normalized float32 NCHW (resize, crop and normalize happen before the model, as
recorded in the export's config.json); test-time augmentation, if the run used it, is part of the graph.
Text: `input_ids`, `attention_mask` (and `token_type_ids` where the tokenizer makes them), int64 [batch,
sequence], padded on the tokenizer's side with its pad id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..addons.tta import with_tta
from ..models import Backbone
from .parity import Feeds

OUTPUT = "logits"
PIXELS = "pixels"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # data.text.tokenize's keys, in order


class ImageLogits(torch.nn.Module):
    """pixels [B, 3, H, W] -> logits [B, num_outputs] (through test-time augmentation, if any)."""

    def __init__(self, module: torch.nn.Module, tta: str = "none"):
        super().__init__()
        self.module = with_tta(module, tta)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.module(pixels)
        return getattr(out, "logits", out)  # transformers image models return a ModelOutput


class TextLogits(torch.nn.Module):
    """input_ids, attention_mask[, token_type_ids] (int64 [B, S], in that order) -> logits [B, num_outputs]."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        if tuple(names) != TOKEN_INPUTS[:len(names)]:
            raise ValueError(f"token inputs {list(names)}: expected a prefix of {list(TOKEN_INPUTS)}")
        self.module, self.names = module, tuple(names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = dict(zip(self.names, (input_ids, attention_mask, token_type_ids)))
        return self.module(**given).logits


def is_text(backbone: Backbone) -> bool:
    return backbone.adapter.modality == "text"


def build(backbone: Backbone, samples: Sequence[Any], *, tta: str = "none", max_length: int | None = None,
          batch: int = 8) -> tuple[torch.nn.Module, list[str], list[Feeds]]:
    """(the module to export, in eval mode, on the CPU; its input names; the gate's batches: the first sample
    alone, then the first `batch` samples together)."""
    module = backbone.module.float().cpu().eval()
    if is_text(backbone):
        from ..data.text import tokenize

        tokenizer = backbone.tokenizer
        enc = tokenize(tokenizer, list(samples), max_length or tokenizer.model_max_length)
        names = list(enc)
        left = tokenizer.padding_side == "left"
        batches = [pad_tokens(enc, [0], tokenizer.pad_token_id, left),
                   pad_tokens(enc, list(range(min(batch, len(samples)))), tokenizer.pad_token_id, left)]
        return TextLogits(module, names).eval(), names, batches
    from ..data import build_transform, load_rgb, to_rgb

    tf = build_transform(backbone.preprocessing, augment="none")
    images = [to_rgb(s) if hasattr(s, "mode") else load_rgb(s) for s in samples[:batch]]
    x = torch.stack([tf(im) for im in images]).numpy()
    return ImageLogits(module, tta).eval(), [PIXELS], [{PIXELS: x[:1]}, {PIXELS: x}]


def pad_tokens(enc: dict[str, list[list[int]]], rows: Sequence[int], pad_id: int, left: bool) -> Feeds:
    """The samples `rows` of a tokenized split as one padded int64 batch (as PadCollate pads)."""
    n = max(len(enc["input_ids"][i]) for i in rows)
    out = {}
    for key, values in enc.items():
        pad = pad_id if key == "input_ids" else 0
        out[key] = np.array([[pad] * (n - len(values[i])) + values[i] if left else
                             values[i] + [pad] * (n - len(values[i])) for i in rows], dtype=np.int64)
    return out


def eager(graph: torch.nn.Module, names: Sequence[str]):
    """feeds -> the eager module's logits as a float32 array: the gate's reference."""

    @torch.inference_mode()
    def run(feeds: Feeds) -> np.ndarray:
        return graph(*(torch.from_numpy(feeds[n]) for n in names)).float().numpy()

    return run


def example(batches: Sequence[Feeds], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The largest gate batch as the tracing example (a batch of 1 would fix the batch axis)."""
    feeds = max(batches, key=lambda f: next(iter(f.values())).shape[0])
    return tuple(torch.from_numpy(feeds[n]) for n in names)
