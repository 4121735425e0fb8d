"""Streaming images from WebDataset tar shards: an IterableDataset that reads each shard once, front to back.

No image is decoded or hashed before training (the label pass, finetunekit.shardfiles, reads the label
members only). Each epoch:

- the shard order is shuffled from (seed, epoch) for training (kept for validation and test);
- the shards are dealt to the "slots": for training, every loader worker of every process (torch.distributed's
  rank and world size when it is initialised: the training loader is a StreamLoader, which accelerate leaves
  alone); for validation and test, every worker of the process that reads them (accelerate's dispatcher
  reads an IterableDataset in process 0 and shares its batches out); with fewer shards than slots, every slot
  reads every shard and keeps every n-th sample;
- training: every slot yields the same number of samples in every epoch: the fewest any deal can give a
  slot (`share`), rounded down to whole batches, so every process runs the same number of batches and none
  ends with a partial one; the rest of a larger share is left out of that epoch (another epoch's deal
  leaves out others). Validation and test yield every sample once;
- training samples pass through a shuffle buffer (`buffer` samples) seeded from (seed, epoch, slot), and
  each sample's augmentation draws from its own seed (seed, epoch, its place in the shards), as the map-style
  datasets' do (data.order).

A sample that fails to decode is skipped and counted (`failed`, shared with the workers: once per epoch it
fails in). The epoch reaches the workers through shared memory (`set_epoch`), so persistent workers work.
"""

from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError, first_line
from ..imagefiles import load_rgb
from ..shardfiles import (IMAGE_EXTS, LABEL_EXTS, ClassIndex, ShardLabels, class_index, declared_classes, key_and_ext,
                          parse_label, read_labels, shard_files, split_folders, tar_members)
from . import die_with_parent, target
from .order import sample_rng, sample_seed

log = logging.getLogger("finetunekit")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torch.distributed, when initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def deal(order: list[int], slot: int, slots: int) -> tuple[list[int], int, int]:
    """(the shards slot `slot` of `slots` reads, in `order`; keep every k-th sample of them from the j-th: (k, j)).
    Whole shards when there are at least as many as slots; else every shard, every `slots`-th sample."""
    if len(order) >= slots:
        return order[slot::slots], 1, 0
    return list(order), slots, slot


def share(counts: list[int], slots: int) -> int:
    """The fewest samples any slot can be dealt by `deal`, whatever the shard order: with whole shards, the
    smallest len(counts) // slots shards; else total // slots."""
    if len(counts) >= slots:
        return sum(sorted(counts)[:len(counts) // slots])
    return sum(counts) // slots


class ShardImages(IterableDataset):
    """(image tensor, class index) from tar shards; `labels`: per sample in shard order, its class index."""

    def __init__(self, files: list[Path], counts: list[int], labels: list[int], transform, *, train: bool,
                 seed: int, batch_size: int, label_of, buffer: int = 1000, by_rank: bool | None = None):
        self.files, self.counts, self.labels = [str(f) for f in files], list(counts), labels
        self.transform, self.train, self.seed = transform, train, seed
        self.batch_size, self.buffer = batch_size, buffer
        self.label_of = label_of  # raw label (int or name) -> class index: shardfiles.ClassIndex
        self.starts = [sum(self.counts[:i]) for i in range(len(self.counts))]  # each shard's first sample id
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.failed = torch.zeros(1, dtype=torch.int64).share_memory_()  # decode failures (data.unreadable)
        self.workers = 1  # the loader's num_workers (make_shard_loader sets it): the slots per process
        self.by_rank = train if by_rank is None else by_rank  # deal to processes too (else accelerate's dispatcher)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def rank_and_world(self) -> tuple[int, int]:
        return rank_and_world() if self.by_rank else (0, 1)

    def per_slot(self) -> int:
        """Training: the samples each slot yields in every epoch (`share`, in whole batches when it holds one)."""
        _, world = self.rank_and_world()
        n = share(self.counts, world * max(1, self.workers))
        return n // self.batch_size * self.batch_size if n >= self.batch_size else n

    def __len__(self) -> int:
        _, world = self.rank_and_world()
        if self.train:
            return self.per_slot() * max(1, self.workers)
        return -(-sum(self.counts) // world)

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        if self.train:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _samples(self, shards: list[int], every: int, first: int):
        """(sample id, image bytes, raw label) of the dealt shards, every `every`-th from the `first`-th."""
        n = 0
        for s in shards:
            position = 0
            for key, members in _grouped(self.files[s]):
                image = next((v for e, v in members.items() if e.rpartition(".")[2] in IMAGE_EXTS), None)
                if image is None:
                    continue
                if n % every == first:
                    label_ext = next((e for e in members if e.rpartition(".")[2] in LABEL_EXTS), None)
                    raw = parse_label(label_ext.rpartition(".")[2], members[label_ext], f"{self.files[s]}: {key}")
                    yield self.starts[s] + position, key, image, raw
                n += 1
                position += 1

    def __iter__(self):
        epoch = int(self._epoch)
        rank, world = self.rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots, slot = world * workers, rank * workers + worker
        order = self.order(epoch)
        shards, every, first = deal(order, slot, slots)
        limit = self.per_slot() if self.train else None
        stream = self._samples(shards, every, first)
        if self.train:
            stream = _shuffled(stream, self.buffer, random.Random(sample_seed(self.seed, epoch, 1_000_000 + slot)))
        yielded = 0
        for sample_id, key, data, raw in stream:
            if limit is not None and yielded >= limit:
                break
            try:
                image = load_rgb(io.BytesIO(data))
            except Exception as e:  # noqa: BLE001 - any decode failure: skipped and counted
                self.failed += 1
                log.warning("warning: shard sample %s: cannot be decoded (%s); skipped, counted in metrics.json's "
                            "unreadable_in_training", key, first_line(e))
                continue
            with sample_rng(sample_seed(self.seed, epoch, sample_id) if self.train else None):
                x = self.transform(image)
            yielded += 1
            yield x, target(self.label_of(raw))


def _shuffled(stream, size: int, rng: random.Random):
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _grouped(path: str):
    """(key, {extension: bytes}) per sample of a tar shard, streamed front to back (the image and label members
    read, the others skipped)."""
    key, members = None, {}

    def wanted(name: str) -> bool:
        last = name.rpartition(".")[2].lower()
        return last in IMAGE_EXTS or last in LABEL_EXTS

    with open(path, "rb", buffering=1 << 20) as f:
        for name, data in tar_members(f, wanted):
            k, ext = key_and_ext(name)
            if k != key:
                if members:
                    yield key, members
                key, members = k, {}
            if data is not None:
                members[ext] = data
    if members:
        yield key, members


@dataclass
class ShardSplits:
    classes: list[str]
    train: ShardLabels  # labels: class indices
    val: ShardLabels
    test: ShardLabels | None
    record: dict  # for split.json: each split's shards, their sizes and modification times, its count


def resolve_shard_splits(path: Path, val: Path | None, test: Path | None) -> ShardSplits:
    """The shard sets of --data, --val and --test (or the train/, val/, test/ folders of --data), their labels
    read in one pass, the classes (classes.txt beside the training shards, else the names found)."""
    folders = split_folders(Path(path)) or {}
    train_path = folders.get("train", Path(path))
    val = val or folders.get("val")
    test = test or folders.get("test")
    if val is None:
        raise UserError(f"--data {path}: shard data needs its own validation shards: --val (a .tar, a pattern or "
                        f"a folder of .tar files), or a val/ folder of them beside train/")
    sets = {"train": ("--data", train_path), "val": ("--val", val), **({"test": ("--test", test)} if test else {})}
    read = {s: read_labels(shard_files(p, option), option) for s, (option, p) in sets.items()}
    origin = {s: f"{option} {p}" for s, (option, p) in sets.items()}
    classes, read["train"].labels = class_index(read["train"].labels, declared_classes(read["train"].files),
                                                origin["train"])
    if len(classes) < 2:
        raise UserError(f"{origin['train']}: found {len(classes)} class{'es' if not classes else ''} {classes}; "
                        f"classification needs at least 2")
    for s in read:
        if s != "train":
            _, read[s].labels = class_index(read[s].labels, classes, f"{origin[s]} (classes of the training shards)")
    record = {s: {"from": str(p), "count": read[s].total, "shards": [
        {"file": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in read[s].files]}
        for s, (_, p) in sets.items()}
    record.setdefault("test", None)
    return ShardSplits(classes, read["train"], read["val"], read.get("test"), record)


class StreamLoader:
    """The training loader of a stream: a DataLoader over ShardImages, dealt to processes by the dataset itself,
    and the batches moved to the device here. Not a DataLoader, so `accelerator.prepare` passes it through:
    accelerate would otherwise re-split an IterableDataset's batches across processes (its dispatcher reads the
    whole stream in process 0). `set_epoch` reaches the workers (loop.fit calls it)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.dataset = loader, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        from accelerate import PartialState
        from accelerate.utils import send_to_device

        device = PartialState().device
        for batch in self.loader:
            yield send_to_device(batch, device, non_blocking=device.type == "cuda")


def make_shard_loader(split: ShardLabels, classes: list[str], transform, batch_size: int, *, train: bool,
                      workers: int, seed: int, pin_memory: bool = False):
    """Training: a StreamLoader (dealt to processes and workers); validation and test: a DataLoader dealt to
    workers, which accelerate's dispatcher shares out among processes (each sample scored once). Batches are
    built in each worker; workers persist (the epoch reaches them through shared memory)."""
    ds = ShardImages(split.files, split.counts, split.labels, transform, train=train, seed=seed,
                     batch_size=batch_size, label_of=ClassIndex(classes))
    ds.workers = max(1, workers)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=die_with_parent if workers else None)
    return StreamLoader(loader) if train else loader
