"""Cached backbone features: a frozen backbone's output is computed once per image and the head trains on it.

Under `--strategy linear-probe` nothing before the head changes, so every epoch would recompute the same
backbone outputs. Instead, one pass records the head's input for every training and validation image (a
forward hook on the head, so it works for any backbone whose head is one module), and the epochs train the
head alone on those vectors. The features are stored on disk under a key made of everything they depend
on (the model and its weights, the preprocessing and transforms, the files' content, the library
versions), so a second run on the same data (another head lr, another seed) skips the backbone entirely,
and any change computes them afresh.

With augmentation and `--cache-views K`, each image's features are computed for K augmented views and
each epoch every sample uses one of its views, drawn from its per-sample seed; without `--cache-views`,
the features are computed once, unaugmented (said in the log): measured as good for a linear probe
(docs/strategies.md), and the probe then reads the backbone once instead of once per epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import fastpath
from .checkpoint import save_tensors
from .data import cache_key, cache_root, cache_unwritable, die_with_parent
from .data.order import sample_seed, split_key

log = logging.getLogger("finetunekit")

FORMAT = 1
VIEW_EPOCHS = 2**31  # cached views draw their augmentation as "epochs" no training run reaches


def cache_dir() -> Path:
    return cache_root() / "features"


def augmented(d) -> bool:
    """Whether the recipe's data section (config.DataConfig) augments training images."""
    return d.augment != "none" or bool(d.rotate or d.elastic or d.vflip)


def why_not(d, modality: str, backbone) -> str | None:
    """Why this linear probe (data section `d`, a config.DataConfig) cannot train on cached features, or None
    when it can."""
    if modality != "image":
        return "text models are not cached yet"
    if d.cache_features == "off":
        return "--cache-features off"
    if d.mixup or d.cutmix:
        return "MixUp/CutMix mix images, not features"
    if d.tta != "none":
        return "--tta needs the backbone at validation"
    if len(backbone.heads) != 1:
        return "the model has several head modules"
    return None


class Features(Dataset):
    """(feature vector, target) per sample; training keys carry a seed that picks one of K views."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets  # [K, N, C], [N] or [N, L]

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = split_key(key)
        view = 0 if seed is None else seed % self.features.shape[0]
        return self.features[view, i], self.targets[i]


class WithDropout(nn.Module):
    """The model's dropout (timm applies it between pooling and classifier), then the head."""

    def __init__(self, p: float, head: nn.Module):
        super().__init__()
        self.dropout, self.head = nn.Dropout(p), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(x))


def head_of(trained: nn.Module) -> nn.Module:
    return trained.head if isinstance(trained, WithDropout) else trained


def _head(backbone) -> nn.Module:
    return backbone.module.get_submodule(backbone.heads[0])


def extract(backbone, dataset, *, views: int, seed: int, augmented: bool, device: torch.device,
            batch_size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every sample of `dataset` (an ImageDataset), once per view: [views, N, C] float32,
    and the targets. Augmented views are drawn from per-sample seeds, so they are the same every time."""
    # outside inference mode: weights converted inside it would become inference tensors, which a later
    # phase (lp-ft's full fine-tune, the test scorer) cannot train or hook
    module = backbone.module.to(device).eval()
    fastpath.channels_last(module)  # a CNN in NHWC: 1.2-1.5x faster inference here (EfficientNet-Lite0, 96 px)
    with torch.inference_mode():
        return _extract(module, _head(backbone), dataset, views=views, seed=seed, augmented=augmented,
                        device=device, batch_size=batch_size, workers=workers)


def _extract(module, head, dataset, *, views, seed, augmented, device, batch_size, workers):
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, args, out: captured.append(args[0].float().cpu()))
    feats, targets = [], torch.empty(0)
    try:
        for view in range(views):
            keys = [(i, sample_seed(seed, VIEW_EPOCHS + view, i)) if augmented else i for i in range(len(dataset))]
            loader = DataLoader(_Keyed(dataset, keys), batch_size=batch_size, num_workers=workers,
                                generator=torch.Generator(), worker_init_fn=die_with_parent if workers else None)
            captured.clear()
            ys = []
            for x, y in loader:
                module(x.to(device))
                ys.append(y)
            feats.append(torch.cat(captured))
            targets = torch.cat(ys)
    finally:
        hook.remove()
    return torch.stack(feats), targets


class _Keyed(Dataset):
    def __init__(self, dataset, keys):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j):
        return self.dataset[self.keys[j]]


def load_or_extract(parts: dict[str, Any], compute, what: str = "features") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Features for `parts` from the cache, or `compute()`d and stored (when the cache can be written: else
    they serve this run only, said once); the bool says whether they were hit. (Also the teacher's logits of
    distillation, `what` = "teacher logits": finetunekit/teacher.py.)"""
    path = cache_dir() / f"{cache_key(parts)}.safetensors"
    if os.path.isfile(path):  # False, not an error, under a folder that cannot be searched
        try:
            d = load_file(str(path))
            return d["features"], d["targets"], True
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed
            log.warning("%s cache %s: unreadable (%s); computing again", what, path, e)
    features, targets = compute()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors({"features": features.contiguous(), "targets": targets.contiguous()}, tmp,
                     metadata={"key": json.dumps(parts, sort_keys=True, default=str)})
        os.replace(tmp, path)
    except OSError as e:  # read-only, not a folder, full
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cache_unwritable(what, cache_dir(), e, "they serve this run only")
    return features, targets, False
