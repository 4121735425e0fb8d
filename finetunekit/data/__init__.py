"""Data: readers and splits (sources), robust image decoding (images), transforms, and the loaders."""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError, first_line
from .images import load_rgb, to_rgb
from .order import EpochBatches, sample_rng, split_key
from .sources import Split, Splits, resolve_splits
from .transforms import Preprocessing, build_transform

__all__ = ["ImageDataset", "Preprocessing", "Split", "Splits", "build_transform", "cache_key", "cache_root",
           "cache_unwritable", "default_workers", "die_with_parent", "load_rgb", "make_loader", "resolve_splits",
           "target", "to_rgb", "unreadable"]

log = logging.getLogger("finetunekit")


def cache_root() -> Path:
    """Where finetunekit keeps what it can compute again (features, decoded images): $FINETUNEKIT_CACHE,
    else $XDG_CACHE_HOME/finetunekit, else ~/.cache/finetunekit."""
    root = os.environ.get("FINETUNEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetunekit")
    return Path(root)


_unwritable: set[tuple[str, str]] = set()  # (cache folder, reason) already reported in this process


def cache_unwritable(what: str, folder: Path, error: OSError, instead: str) -> None:
    """Log, once per folder and reason in a process, that a cache cannot be written (read-only, not a
    folder, full) and what the run does instead."""
    reason = error.strerror or str(error)
    if (str(folder), reason) not in _unwritable:
        _unwritable.add((str(folder), reason))
        log.warning("warning: %s: could not write the cache at %s (%s); %s", what, folder, reason, instead)


def cache_key(parts: dict[str, Any]) -> str:
    """The name of a cache entry: a hash of everything its content depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def target(label):
    """A sample's target: a class index as is; a multi-hot list or a number (multi-label, regression) as a
    float32 tensor."""
    return label if isinstance(label, int) else torch.tensor(label, dtype=torch.float32)


class ImageDataset(Dataset):
    """(image tensor [3, H, W], class index) for each file of a split.

    A file that passed the start-up scan but fails to decode now (damaged after the scan, or broken in a way
    only a full decode finds: data.images) is replaced by the next file of the split that decodes, with its
    own target, so batches keep their size; it is counted once in `failed` (memory shared with the loader's
    workers) and logged once per process. `unreadable(datasets)` sums the counts for metrics.json."""

    def __init__(self, split: Split, transform):
        self.paths, self.labels, self.transform = split.paths, split.labels, transform
        self.failed = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()  # 1: failed to decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = split_key(key)  # training keys carry a per-sample seed for the augmentation (data.order)
        for j in itertools.chain(range(i, len(self.paths)), range(i)):  # i itself, unless it failed before
            if self.failed[j]:
                continue
            try:
                image = load_rgb(self.paths[j])
            except Exception as e:  # noqa: BLE001 - any decode failure: skipped and counted
                self.failed[j] = 1
                log.warning("warning: %s: cannot be decoded (%s); replaced by the next image of its split and "
                            "counted in metrics.json's unreadable_in_training", self.paths[j], first_line(e))
                continue
            with sample_rng(seed):
                return self.transform(image), target(self.labels[j])
        raise UserError(f"{self.paths[i]}: no image of this split can be decoded any more")


def unreadable(datasets) -> int:
    """How many files of these datasets failed to decode during the run (ImageDataset.failed)."""
    return sum(int(f.sum()) for d in datasets if (f := getattr(d, "failed", None)) is not None)


def default_workers() -> int:
    """Leave a core for the training process; more than 8 workers rarely helps a single device."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


_PR_SET_PDEATHSIG = 1


def die_with_parent(worker_id: int) -> None:
    """A loader's worker_init_fn: on Linux the kernel sends this worker SIGKILL when the process that started
    it dies, kill -9 included (torch's own check notices a dead parent up to 5 s later). Only for a direct
    child (fork, spawn; a forkserver's workers are not the trainer's children); no-op elsewhere. Draws no
    random number: training stays bit-identical."""
    parent = multiprocessing.parent_process()
    if not sys.platform.startswith("linux") or parent is None or os.getppid() != parent.pid:
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent.pid:  # the parent died before prctl: nothing will send the signal
        os._exit(1)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int, seed: int,
                pin_memory: bool = False, collate_fn=None) -> DataLoader:
    # a loader's own generator seeds its workers: creating an iterator never draws from torch's global RNG
    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                  generator=torch.Generator().manual_seed(seed), collate_fn=collate_fn,
                  worker_init_fn=die_with_parent if workers else None)
    if not train:
        return DataLoader(dataset, batch_size=batch_size, **common)
    order = EpochBatches(len(dataset), batch_size, seed, drop_last=len(dataset) > batch_size)
    return DataLoader(dataset, batch_sampler=order, **common)
