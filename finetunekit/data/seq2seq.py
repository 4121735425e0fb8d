"""Sequence-to-sequence data: (source text, target text) pairs from a CSV, TSV, JSONL or Parquet table, tokenized
once, batched with dynamic padding.

Columns are named by --source-column/--target-column or detected from common names (the choice is logged). A row
with an empty source or target, or bytes that are not UTF-8, is skipped and counted with its file and line; past
--max-bad-fraction the run stops before any model loads. Without --val, a seeded random fraction is held out.

A batch is (features, labels, indices): features {"input_ids", "attention_mask"} padded with the tokenizer's pad
id to the batch's longest source; labels [B, T] the target ids padded with -100 to the batch's longest target
(what `DataCollatorForSeq2Seq` does; the loss ignores -100); indices the samples' dataset positions (the
per-epoch generation subset: tasks/seq2seq.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .order import split_key
from .splits import check_bad, lookup, random_split
from .tables import Table, _has_surrogates, _text, read_table, warn_skipped

IGNORE = -100  # the label id the loss skips (padding)
SOURCE_NAMES = ("source", "src", "input", "inputs", "input_text", "text", "document", "article", "question",
                "prompt")
TARGET_NAMES = ("target", "tgt", "output", "outputs", "target_text", "summary", "translation", "answer",
                "highlights", "completion", "label")


@dataclass
class PairSplit:
    sources: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.sources)


@dataclass
class PairSplits:
    source_column: str
    target_column: str
    train: PairSplit
    val: PairSplit
    test: PairSplit | None
    record: dict
    skipped: list[tuple[str, str]]


@dataclass
class _Rows:  # what splits.check_bad reads: the usable rows (`texts`) and the rejects
    texts: list[tuple[str, str]]
    bad: list[tuple[str, str]]


def pick_columns(table: Table, source_column: str | None, target_column: str | None) -> tuple[str, str, dict]:
    """(source column, target column, how each was chosen); a one-line error naming the flag otherwise."""
    have = lookup(table.columns)
    chosen, how = [], {}
    for flag, given, names, role in (("--source-column", source_column, SOURCE_NAMES, "source"),
                                     ("--target-column", target_column, TARGET_NAMES, "target")):
        if given is not None:
            if given.lower() not in have:
                raise UserError(f"{flag} {given}: no such column in {table.origin} (columns: {table.columns})")
            chosen.append(have[given.lower()])
            how[role] = "given"
            continue
        found = next((have[n] for n in names if n in have and have[n] not in chosen), None)
        if found is None:
            raise UserError(f"{table.origin}: no {role} column found (looked for {', '.join(names[:6])}, ...; "
                            f"columns: {table.columns}); name it with {flag}")
        chosen.append(found)
        how[role] = "detected"
    if chosen[0] == chosen[1]:
        raise UserError(f"--source-column/--target-column: both name the column {chosen[0]!r}")
    return chosen[0], chosen[1], how


def parse_pairs(table: Table, source: str, target: str) -> _Rows:
    out = _Rows([], list(table.bad))
    for line, row in table.rows:
        where = f"{table.path}:{line}"
        values = (_text(row.get(source)), _text(row.get(target)))
        empty = next((c for c, v in zip((source, target), values) if v is None), None)
        if empty is not None:
            out.bad.append((where, f"empty or missing text in column {empty!r}"))
        elif any(_has_surrogates(v) for v in values):
            out.bad.append((where, "not UTF-8 text"))
        else:
            out.texts.append(values)
    out.bad.sort(key=lambda b: int(b[0].rsplit(":", 1)[1]))
    return out


def _split(rows: _Rows) -> PairSplit:
    return PairSplit([s for s, _ in rows.texts], [t for _, t in rows.texts])


def resolve_pair_splits(path: Path, val: Path | None, test: Path | None, *, source_column: str | None,
                        target_column: str | None, val_fraction: float, seed: int,
                        max_bad_fraction: float) -> PairSplits:
    train_t = read_table(path, "--data")
    val_t = read_table(val, "--val") if val else None
    test_t = read_table(test, "--test") if test else None
    source, target, how = pick_columns(train_t, source_column, target_column)
    parsed = [_pairs(t, source, target, max_bad_fraction, "the training table has it")
              for t in (train_t, val_t, test_t) if t is not None]
    skipped = [b for rows in parsed for b in rows.bad]
    warn_skipped(skipped)
    it = iter(parsed)
    train = _split(next(it))
    record: dict[str, Any] = {"task": "seq2seq", "source_column": source, "target_column": target,
                              "columns_chosen": how}
    if val_t is not None:
        val_split = _split(next(it))
        record["val"] = {"from": str(val)}
    else:
        held = random_split(len(train), val_fraction, seed)
        val_split = PairSplit([s for s, h in zip(train.sources, held) if h], [t for t, h in zip(train.targets, held) if h])
        train = PairSplit([s for s, h in zip(train.sources, held) if not h],
                          [t for t, h in zip(train.targets, held) if not h])
        record["val"] = {"from": f"random split of {path}", "fraction": val_fraction, "seed": seed}
    if len(train) == 0 or len(val_split) == 0:
        raise UserError(f"--data {path}: too few usable rows to hold out a validation set; pass --val")
    test_split = _split(next(it)) if test_t is not None else None
    record["train"] = {"from": str(path), "count": len(train)}
    record["val"]["count"] = len(val_split)
    record["test"] = {"from": str(test), "count": len(test_split)} if test_split else None
    return PairSplits(source, target, train, val_split, test_split, record, skipped)


def read_pairs(path: Path, source_column: str, target_column: str, option: str = "--data",
               max_bad_fraction: float = 0.05) -> tuple[PairSplit, list[tuple[str, str]]]:
    """A table read with a saved model's columns (for `evaluate`): the pairs and the skipped rows."""
    rows = _pairs(read_table(path, option), source_column, target_column, max_bad_fraction,
                  f"the model was trained on columns {source_column}, {target_column}")
    return _split(rows), rows.bad


def _pairs(table: Table, source: str, target: str, max_bad_fraction: float, hint: str):
    """A table's pairs from its `source` and `target` columns (names matched case-insensitively); one line naming a
    missing column (`hint`: why it was expected), or too many unusable rows."""
    have = lookup(table.columns)
    missing = [c for c in (source, target) if c.lower() not in have]
    if missing:
        raise UserError(f"{table.origin}: no column {missing[0]!r} ({hint}; columns here: {table.columns})")
    rows = parse_pairs(table, have[source.lower()], have[target.lower()])
    check_bad(rows, table, max_bad_fraction)
    return rows


def encode_targets(tokenizer, targets: list[str], max_length: int) -> list[list[int]]:
    """Target ids as the model learns them (`text_target`: a multilingual tokenizer's target-language tokens)."""
    return [list(ids) for ids in tokenizer(text_target=targets, truncation=True, max_length=max_length)["input_ids"]]


class Seq2SeqDataset(Dataset):
    """(source features, target ids, index) per sample, tokenized once. `texts`: the sources (the predictions
    files' item column); `lengths`: source plus target tokens (batches of similar lengths pad least)."""

    def __init__(self, split: PairSplit, tokenizer, max_length: int, max_target_length: int):
        self.texts, self.references = list(split.sources), list(split.targets)
        enc = tokenizer(self.texts, truncation=True, max_length=max_length)
        self.inputs = {"input_ids": [list(x) for x in enc["input_ids"]],
                       "attention_mask": [list(x) for x in enc["attention_mask"]]}
        self.labels = encode_targets(tokenizer, self.references, max_target_length)
        self.source_lengths = [len(x) for x in self.inputs["input_ids"]]
        self.target_lengths = [len(x) for x in self.labels]
        self.lengths = [s + t for s, t in zip(self.source_lengths, self.target_lengths)]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key: int | tuple[int, int]):
        i, _ = split_key(key)  # training keys carry a per-sample seed (data.order); nothing here is random
        return {k: v[i] for k, v in self.inputs.items()}, self.labels[i], i


class Seq2SeqCollate:
    """Pad sources with the pad id (attention mask 0) and labels with -100, each to the batch's longest (rounded
    up to `multiple`: 8 on GPUs, for tensor cores)."""

    def __init__(self, pad_id: int, multiple: int = 1):
        self.pad_id, self.multiple = pad_id, multiple

    def _width(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    def __call__(self, batch: list[tuple[dict[str, list[int]], list[int], int]]):
        samples, labels, indices = zip(*batch)
        n = self._width(max(len(s["input_ids"]) for s in samples))
        features = {"input_ids": torch.tensor([s["input_ids"] + [self.pad_id] * (n - len(s["input_ids"]))
                                               for s in samples], dtype=torch.long),
                    "attention_mask": torch.tensor([s["attention_mask"] + [0] * (n - len(s["attention_mask"]))
                                                    for s in samples], dtype=torch.long)}
        m = self._width(max(len(y) for y in labels))
        targets = torch.tensor([list(y) + [IGNORE] * (m - len(y)) for y in labels], dtype=torch.long)
        return features, targets, torch.tensor(indices, dtype=torch.long)
