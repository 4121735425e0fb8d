"""The decoded-image cache: each image is decoded and resized once and kept as uint8 pixels on disk.

Small-model fine-tuning spends much of an epoch opening, decoding and resizing the same JPEGs again. With
the cache, one pass (threads: Pillow releases the GIL) stores every image of a split, already upright, RGB
and resized (`transforms.build_tensor_transform` says to what size), in one flat file of uint8 pixels
(planar: channel, row, column) and an index of (offset, height, width). Epochs then read the pixels through a memory map, augment the uint8
tensors, and normalize whole batches where they are trained (`Normalize`: on the GPU when there is one).

An entry is keyed by the split's content hash (every file's bytes and name, in order), how the images are
stored, and the Pillow version, so changing any file builds a new entry. Entries are written to a
temporary folder and renamed into place: a crash never leaves a half-written entry that looks complete.
`--cache-images auto` uses the cache when it pays: 2 or more epochs (or an entry already built), and an
estimated size within half the free disk space of the cache folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import first_line
from . import cache_key, cache_root, cache_unwritable, target
from .images import load_rgb
from .order import sample_rng, split_key

log = logging.getLogger("finetunekit")

FORMAT = 2  # 2: planar (channel, row, column) pixels
PIXELS, INDEX = "pixels.u8", "index.npy"


def cache_dir() -> Path:
    return cache_root() / "images"


def entry_for(content: str, store) -> Path:
    """Where the pixels of a split with this content hash, stored this way, are kept."""
    from PIL import __version__ as pillow

    return cache_dir() / cache_key({"format": FORMAT, "content": content, "store": repr(store), "pillow": pillow})


def complete(entry: Path) -> bool:
    # os.path.isfile: False, not an error, under a folder that cannot be searched
    return os.path.isfile(entry / INDEX) and os.path.isfile(entry / PIXELS)


class DecodedImages(Dataset):
    """(uint8 image tensor [3, H, W], target) for each image of a cache entry; training keys carry the
    per-sample seed of the augmentation (data.order), as ImageDataset's do."""

    def __init__(self, entry: Path, labels: list, transform=None):
        self.entry, self.labels, self.transform = Path(entry), labels, transform
        self.index = np.load(self.entry / INDEX)
        self.failed = torch.from_numpy((self.index[:, 1] == 0).astype(np.uint8))  # not decodable at the build
        self.readable = np.flatnonzero(self.index[:, 1] > 0)
        self._pixels: np.memmap | None = None  # opened in each worker process on first use

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = split_key(key)
        if self.failed[i]:  # replaced by the next image that decoded (wrapping round), as ImageDataset does
            later = self.readable[self.readable > i]
            i = int(later[0] if len(later) else self.readable[0])
        if self._pixels is None:
            self._pixels = np.memmap(self.entry / PIXELS, dtype=np.uint8, mode="r")
        offset, h, w = (int(v) for v in self.index[i])
        x = torch.from_numpy(np.array(self._pixels[offset:offset + h * w * 3])).view(3, h, w)
        if self.transform is not None:
            with sample_rng(seed):
                x = self.transform(x)
        return x, target(self.labels[i])


class Normalize:
    """uint8 image batches [B, 3, H, W] -> float32, (x / 255 - mean) / std, in one pass where the batch is:
    on the GPU after a 4x smaller transfer, or in the training process on the CPU (the loader workers hand
    over uint8 batches, a quarter of the bytes of float ones). Anything else passes through unchanged."""

    def __init__(self, mean, std):
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)

    def __call__(self, x):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            return x
        if self.scale.device != x.device:
            self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
        return (x * self.scale).add_(self.shift)  # the product is float32: one pass converts and scales


def estimate_bytes(paths: list[str], store, sample: int = 256) -> int:
    """Stored size, from the stored sizes of up to `sample` evenly spaced images (headers only when the
    store does not crop)."""
    from PIL import Image

    if not paths:
        return 0
    picks = paths[:: max(1, len(paths) // sample)][:sample]
    total = 0
    for p in picks:
        with Image.open(p) as im:
            w, h = im.size
        size = getattr(store, "size", None)
        if isinstance(size, int) and min(w, h) > size:  # ShorterSide: only the scale matters
            s = size / min(w, h)
            w, h = round(w * s), round(h * s)
        elif size is None:  # a resize + centre crop: the crop's size
            crop = store.transforms[-1].size
            h, w = crop if isinstance(crop, (tuple, list)) else (crop, crop)
        total += w * h * 3
    return total * len(paths) // len(picks)


def _decode(store, path: str) -> np.ndarray:
    """[H, W, 3] uint8 (load_rgb gives RGB, resizing keeps it); [0, 0, 3] for a file that no longer decodes
    (stored so, replaced when read: DecodedImages)."""
    try:
        image = load_rgb(path)
    except Exception as e:  # noqa: BLE001 - any decode failure: skipped and counted
        log.warning("warning: %s: cannot be decoded (%s); replaced by the next image of its split and counted in "
                    "metrics.json's unreadable_in_training", path, first_line(e))
        return np.zeros((0, 0, 3), dtype=np.uint8)
    return np.asarray(store(image), dtype=np.uint8)


def build(entry: Path, paths: list[str], store, threads: int | None = None) -> int:
    """Decode, resize and write every image of `paths` to `entry`; returns the bytes written."""
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = np.empty((len(paths), 3), dtype=np.int64)
    offset = 0
    try:
        with open(tmp / PIXELS, "wb") as f, ThreadPoolExecutor(threads or min(8, (os.cpu_count() or 1))) as pool:
            for i, a in enumerate(pool.map(lambda p: _decode(store, p), paths)):
                f.write(np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes())  # planar: batches stack as NCHW
                index[i] = offset, a.shape[0], a.shape[1]
                offset += a.size
        np.save(tmp / INDEX, index)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first
            if not os.path.isfile(entry / INDEX):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return offset


def prepare(split_name: str, entry: Path, paths: list[str], store, *, budget: int | None) -> Path | None:
    """The cache entry for a split: found, or built when its estimated size is within `budget` bytes
    (None: no limit). None when it is not there and cannot be built (the reason is logged)."""
    if complete(entry):
        log.debug("decoded images (%s): %d read from the cache %s", split_name, len(paths), entry)
        return entry
    need = estimate_bytes(paths, store)
    if budget is not None and need > budget:
        log.info("decoded images (%s): not cached: about %.0f MB would exceed the budget of %.0f MB (half the "
                 "free disk space at %s)", split_name, need / 2**20, budget / 2**20, cache_dir())
        return None
    started = time.perf_counter()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        written = build(entry, paths, store)
    except OSError as e:  # read-only, not a folder, full
        cache_unwritable("decoded images", entry.parent, e, "reading the files instead")
        return None
    log.debug("decoded images (%s): %d decoded into the cache in %.1fs (%.0f MB at %s)", split_name, len(paths),
             time.perf_counter() - started, written / 2**20, entry)
    return entry


def free_budget() -> int | None:
    """Half the free space where the cache goes; None (no limit: a failing write says why) when it cannot
    be measured there."""
    root = cache_dir()
    while not os.path.exists(root):
        root = root.parent
    try:
        return shutil.disk_usage(root).free // 2
    except OSError:
        return None


def decoded_datasets(datasets: dict[str, Any], contents: dict[str, str], *, mode: str, epochs: int,
                     pre, augment: str, rotate: float, elastic: float, vflip: bool) -> dict[str, DecodedImages] | None:
    """Cached replacements for the ImageDatasets of `datasets` ("train", "val"), or None when the cache is
    off or does not pay (the reason is logged). `contents`: each split's content hash."""
    from .transforms import build_tensor_transform

    if mode == "off":
        return None
    train_store, train_tf = build_tensor_transform(pre, augment, rotate=rotate, elastic=elastic, vflip=vflip)
    eval_store, _ = build_tensor_transform(pre, "none")
    plan = {"train": (train_store, train_tf), "val": (eval_store, None)}
    entries = {s: entry_for(contents[s], plan[s][0]) for s in datasets}
    if mode == "auto" and epochs < 2 and not all(complete(e) for e in entries.values()):
        log.debug("decoded images: not cached (1 epoch: each image is decoded once either way; --cache-images on "
                 "caches it for later runs)")
        return None
    budget = None if mode == "on" else free_budget()
    out = {}
    for split, ds in datasets.items():
        entry = prepare(split, entries[split], ds.paths, plan[split][0], budget=budget)
        if entry is None:
            return None
        out[split] = DecodedImages(entry, ds.labels, plan[split][1])
        if budget is not None:
            budget = free_budget()
    return out
