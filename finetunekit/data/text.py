"""Text batches: tokenize once, pad per batch, group by length, optional token-level augmentation.

- Every split is tokenized once, before training, with the (fast) tokenizer's batch call; epochs reuse the
  ids. Only synonym replacement, which works on words, re-tokenizes a training sample when it is drawn.
- Padding is per batch, to the batch's longest sample (a multiple of 8 on GPUs), never to --max-length.
- Training batches group samples of similar length: shuffle, cut into mega-batches of 50 batches, sort
  each by length, cut into batches, shuffle the batches. Much less padding, still a random order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError
from .order import EpochBatches, split_key

_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize(tokenizer, texts: Sequence[tuple[str, ...]], max_length: int) -> dict[str, list[list[int]]]:
    """{input_ids, attention_mask[, token_type_ids]}: one unpadded list per sample, truncated to max_length."""
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
    return {k: enc[k] for k in _KEYS if k in enc}


def read_synonyms(path: Path) -> dict[str, list[str]]:
    """One group of interchangeable words per line, comma- or tab-separated; '#' starts a comment."""
    table: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--synonyms {path}: cannot read it as UTF-8 text ({e})") from None
    for line in lines:
        line = line.split("#", 1)[0]
        words = [w.strip().lower() for w in line.replace("\t", ",").split(",") if w.strip()]
        for w in words:
            table.setdefault(w, []).extend(o for o in words if o != w and o not in table.get(w, []))
    if not table:
        raise UserError(f"--synonyms {path}: no synonym groups found (expected words separated by commas)")
    return table


class TokenAugment:
    """Token-level noise on input ids (specials untouched): delete, swap with the next, replace by [MASK]."""

    def __init__(self, delete: float, swap: float, mask: float, mask_id: int | None, special_ids: set[int]):
        if mask and mask_id is None:
            raise UserError("--token-mask: this tokenizer has no mask token")
        self.delete, self.swap, self.mask, self.mask_id, self.special = delete, swap, mask, mask_id, special_ids

    @property
    def active(self) -> bool:
        return bool(self.delete or self.swap or self.mask)

    def __call__(self, sample: dict[str, list[int]], rng: random.Random) -> dict[str, list[int]]:
        ids = sample["input_ids"]
        keep = [i for i, t in enumerate(ids)
                if t in self.special or not (self.delete and rng.random() < self.delete)]
        if len(keep) == sum(t in self.special for t in ids):
            keep = list(range(len(ids)))  # never delete every word
        out = {k: [v[i] for i in keep] for k, v in sample.items()}
        ids = out["input_ids"]
        for i in range(len(ids) - 1):
            if self.swap and ids[i] not in self.special and ids[i + 1] not in self.special \
                    and rng.random() < self.swap:
                ids[i], ids[i + 1] = ids[i + 1], ids[i]
        if self.mask:
            out["input_ids"] = [self.mask_id if t not in self.special and rng.random() < self.mask else t
                                for t in ids]
        return out


def replace_synonyms(text: str, synonyms: dict[str, list[str]], prob: float, rng: random.Random) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        options = synonyms.get(w.lower())
        if options and rng.random() < prob:
            words[i] = rng.choice(options)
    return " ".join(words)


class TextDataset(Dataset):
    """(features, target) per sample, from ids tokenized once; training samples may be augmented."""

    def __init__(self, texts: Sequence[tuple[str, ...]], targets: Sequence[Any], tokenizer, max_length: int,
                 augment: TokenAugment | None = None, synonyms: dict[str, list[str]] | None = None,
                 synonym_prob: float = 0.0, seed: int = 0):
        self.texts, self.targets = list(texts), list(targets)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.encoded = tokenize(tokenizer, self.texts, max_length)
        self.lengths = [len(ids) for ids in self.encoded["input_ids"]]
        self.augment = augment if augment is not None and augment.active else None
        self.synonyms, self.synonym_prob = synonyms, synonym_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = split_key(key)  # training keys carry a per-sample seed (data.order)
        rng = random.Random(self.seed if seed is None else seed)
        if self.synonyms:
            texts = tuple(replace_synonyms(t, self.synonyms, self.synonym_prob, rng) for t in self.texts[i])
            enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
            sample = {k: list(enc[k]) for k in self.encoded}
        else:
            sample = {k: v[i] for k, v in self.encoded.items()}
        if self.augment is not None:
            sample = self.augment(sample, rng)
        return sample, self.targets[i]


class PadCollate:
    """Pad a batch to its longest sample (rounded up to `multiple`), on the tokenizer's padding side."""

    def __init__(self, pad_id: int, left: bool, target_dtype: torch.dtype, multiple: int = 1):
        self.pad_id, self.left, self.dtype, self.multiple = pad_id, left, target_dtype, multiple

    def __call__(self, batch: list[tuple[dict[str, list[int]], Any]]):
        samples, targets = zip(*batch)
        n = max(len(s["input_ids"]) for s in samples)
        n = -(-n // self.multiple) * self.multiple
        features = {}
        for key in samples[0]:
            pad = self.pad_id if key == "input_ids" else 0
            rows = [([pad] * (n - len(s[key])) + s[key]) if self.left else (s[key] + [pad] * (n - len(s[key])))
                    for s in samples]
            features[key] = torch.tensor(rows, dtype=torch.long)  # [B, n]
        return features, torch.tensor(targets, dtype=self.dtype)


def make_text_loader(dataset: TextDataset, batch_size: int, *, train: bool, group_by_length: bool, seed: int,
                     collate: PadCollate) -> DataLoader:
    """Text batching runs in the main process: collating pre-tokenized ids costs far less than a worker hop."""
    if train:
        lengths = dataset.lengths if group_by_length else None
        return DataLoader(dataset, batch_sampler=EpochBatches(len(dataset), batch_size, seed, lengths=lengths),
                          collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    # evaluation: sorted by length for the least padding; the loader restores nothing, metrics don't care
    return DataLoader(dataset, batch_sampler=SortedBatches(dataset.lengths, batch_size), collate_fn=collate,
                      generator=torch.Generator())


class SortedBatches(Sampler[list[int]]):
    """Evaluation batches of indices sorted by length, all of `batch_size` but the last. A sampler with a
    `batch_size` (not a plain list of batches), so that accelerate shards it across processes with even batches
    and `gather_for_metrics` drops exactly the padding it added (each sample counted once)."""

    def __init__(self, lengths, batch_size: int):
        self.batch_size, self.drop_last = batch_size, False
        self.order = sorted(range(len(lengths)), key=lengths.__getitem__)

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.order), self.batch_size):
            yield self.order[i:i + self.batch_size]
