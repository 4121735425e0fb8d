"""Where labelled texts come from: CSV, TSV, JSONL or Parquet tables, and how they split into train/val/test.

Columns are named by the user or detected from common names (the choice is logged). A row with an empty
or missing text or label, a value that does not parse, or bytes that are not UTF-8 is skipped and counted
with its file and line; past --max-bad-fraction the run stops before any model loads.

    task               label column                                       target per sample
    text-classification   one class name per row                          class index
    text-multilabel       delimited names ("sports|politics"), a JSON     multi-hot [C] floats
                          list, or several 0/1 columns; an empty cell
                          means "no label" (a valid all-zero target)
    text-regression       a number                                        float
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .splits import check_bad, class_names, lookup, random_split, stratified_split, targeter, task_kind

log = logging.getLogger("finetunekit")

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet"}
_PAIR_NAMES = (("premise", "hypothesis"), ("sentence1", "sentence2"), ("text_a", "text_b"),
               ("question1", "question2"), ("question", "passage"), ("question", "sentence"),
               ("query", "document"))
_TEXT_NAMES = ("text", "sentence", "review", "content", "document", "comment", "body", "tweet", "utterance",
               "question", "title")
_LABEL_NAMES = ("label", "labels", "target", "targets", "class", "category", "categories", "sentiment",
                "score", "y")
_DELIMITERS = ("|", ";", ",")
_TRUE, _FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}
_MAX_LISTED = 20  # skipped rows listed in the log (all of them go to split.json)


@dataclass
class Table:
    """The rows of one file: (line number, {column: value}) for each readable row."""

    path: Path
    option: str  # "--data", "--val", "--test"
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]
    bad: list[tuple[str, str]] = field(default_factory=list)  # ("file:line", reason)

    @property
    def origin(self) -> str:
        return f"{self.option} {self.path}"


@dataclass
class TextSplit:
    texts: list[tuple[str, ...]]  # one text, or two for sentence pairs
    targets: list  # class index | multi-hot list[float] | float, per sample

    def __len__(self) -> int:
        return len(self.texts)


def describe_columns(record: dict) -> str:
    texts, labels, how = record["text_columns"], record["label_columns"], record["columns_chosen"]
    delimiter = record.get("label_delimiter")
    return (f"text column{'s' if len(texts) > 1 else ''}: {', '.join(texts)} ({how['text']}); "
            f"label column{'s' if len(labels) > 1 else ''}: {', '.join(labels)} ({how['label']})"
            + (f"; label delimiter {delimiter!r}" if delimiter else ""))


@dataclass
class TextSplits:
    task: str
    text_columns: list[str]
    label_columns: list[str]
    classes: list[str]  # class or label names; empty for regression
    train: TextSplit
    val: TextSplit
    test: TextSplit | None
    record: dict  # how the data was read and split, saved with the run
    skipped: list[tuple[str, str]]  # ("file:line", reason)


def read_table(path: Path, option: str) -> Table:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{option} {path}: expected a table ending in {', '.join(SUFFIXES)}, "
                        f"got '{path.suffix or 'no suffix'}'")
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    table = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl,
             "parquet": _read_parquet}[kind](path, option)
    if not table.rows and not table.bad:
        raise UserError(f"{table.origin}: the table has no rows")
    return table


def _read_delimited(path: Path, option: str) -> Table:
    tsv = SUFFIXES[path.suffix.lower()] == "tsv"
    # undecodable bytes become lone surrogates, so one bad row is skipped instead of failing the file
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    # TSV has no quoting (texts may contain quote characters); CSV uses standard quoting
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=False)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise UserError(f"{option} {path}: malformed header: {e}") from None
    if not header or not any(h.strip() for h in header):
        raise UserError(f"{option} {path}: the file is empty (expected a header row of column names)")
    columns = [h.strip() for h in header]
    table = Table(path, option, columns, [])
    line = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            table.bad.append((f"{path}:{line}", f"malformed row ({e})"))
            line = reader.line_num + 1
            continue
        where, line = f"{path}:{line}", reader.line_num + 1
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        first = int(where.rsplit(":", 1)[1])
        if len(fields) != len(columns) and line - first > 1:
            # an unclosed quote swallows every following line into one record: count each line lost
            table.bad += [(f"{path}:{n}", f"inside a quoted field opened on line {first} and not closed as "
                                          f"expected") for n in range(first, line)]
        elif len(fields) != len(columns):
            table.bad.append((where, f"{len(fields)} fields, the header has {len(columns)}"))
        elif any(_has_surrogates(f) for f in fields):
            table.bad.append((where, "not UTF-8 text"))
        else:
            table.rows.append((first, dict(zip(columns, fields))))
    return table


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _read_jsonl(path: Path, option: str) -> Table:
    table = Table(path, option, [], [])
    seen: dict[str, None] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                table.bad.append((where, "not UTF-8 text"))
                continue
            except json.JSONDecodeError as e:
                table.bad.append((where, f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                table.bad.append((where, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            seen.update(dict.fromkeys(obj))
            table.rows.append((number, obj))
    table.columns = list(seen)
    return table


def _read_parquet(path: Path, option: str) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{option} {path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        data = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - arrow raises many types for a broken file
        raise UserError(f"{option} {path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    columns = list(data[0]) if data else []
    # Parquet has no lines: rows are numbered from 1, as a reader of the file would count them
    return Table(path, option, columns, [(i + 1, row) for i, row in enumerate(data)])


# ---- columns ----

def pick_columns(table: Table, task: str, text_column: str | None, label_column: str | None
                 ) -> tuple[list[str], list[str], dict[str, str]]:
    """(text columns, label columns, how each was chosen). Names match case-insensitively."""
    have = lookup(table.columns)

    def named(spec: str, flag: str) -> list[str]:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        missing = [n for n in names if n.lower() not in have]
        if missing:
            raise UserError(f"{flag} {spec}: {table.origin} has no column {missing[0]!r} "
                            f"(columns: {table.columns})")
        return [have[n.lower()] for n in names]

    how = {}
    labels: list[str] = []
    if label_column:
        labels, how["label"] = named(label_column, "--label-column"), "given"
        if len(labels) > 1 and task_kind(task) != "multilabel":
            raise UserError(f"--label-column {label_column}: several label columns are for multi-label "
                            f"tasks (--task text-multilabel or image-multilabel)")
    if text_column:
        texts, how["text"] = named(text_column, "--text-column"), "given"
        if len(texts) > 2:
            raise UserError(f"--text-column {text_column}: one column, or two for sentence pairs")
    else:
        free = {k: v for k, v in have.items() if v not in labels}
        pair = next((p for p in _PAIR_NAMES if all(n in free for n in p)), None)
        single = next((n for n in _TEXT_NAMES if n in free), None)
        if pair is None and single is None:
            raise UserError(f"{table.origin}: no text column found among {table.columns}; "
                            f"name it with --text-column")
        texts, how["text"] = [free[n] for n in (pair or (single,))], "detected"
    if not labels:
        name = next((n for n in _LABEL_NAMES if n in have and have[n] not in texts), None)
        if name is None:
            raise UserError(f"{table.origin}: no label column found among {table.columns}; "
                            f"name it with --label-column")
        labels, how["label"] = [have[name]], "detected"
    overlap = set(texts) & set(labels)
    if overlap:
        raise UserError(f"--label-column: column {sorted(overlap)[0]!r} is also a text column")
    return texts, labels, how


# ---- values ----

def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip()
    return s or None


def _class_name(value: Any) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON/Parquet 1.0 and CSV "1" name the same class
    if isinstance(value, bool):
        value = int(value)
    return _text(value)


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _flag01(value: Any) -> float | None:
    s = str(value).strip().lower() if value is not None else ""
    return 1.0 if s in _TRUE else 0.0 if s in _FALSE else None


def _label_list(value: Any, delimiter: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        names = [_class_name(v) for v in value]
        return None if any(n is None for n in names) else names
    return [s.strip() for s in str(value).split(delimiter) if s.strip()]


def guess_delimiter(tables: list[Table], column: str) -> str:
    values = [str(r[column]) for t in tables for _, r in t.rows[:1000] if isinstance(r.get(column), str)]
    return next((d for d in _DELIMITERS if any(d in v for v in values)), _DELIMITERS[0])


@dataclass
class _Rows:
    texts: list[tuple[str, ...]]
    labels: list  # raw parsed labels: class name | list of names | multi-hot | float
    bad: list[tuple[str, str]]


def parse_rows(table: Table, task: str, texts: list[str], labels: list[str], delimiter: str) -> _Rows:
    out = _Rows([], [], list(table.bad))
    for line, row in table.rows:
        where = f"{table.path}:{line}"
        values = tuple(_text(row.get(c)) for c in texts)
        empty = next((c for c, v in zip(texts, values) if v is None), None)
        if empty is not None:
            out.bad.append((where, f"empty or missing text in column {empty!r}"))
            continue
        if any(_has_surrogates(v) for v in values):
            out.bad.append((where, "not UTF-8 text"))
            continue
        raw = [row.get(c) for c in labels]
        if task_kind(task) == "classification":
            label = _class_name(raw[0])
            reason = f"empty or missing label in column {labels[0]!r}"
        elif task_kind(task) == "regression":
            label = _number(raw[0])
            reason = f"column {labels[0]!r}: expected a finite number, got {raw[0]!r}"
        elif len(labels) > 1:
            flags = [_flag01(v) for v in raw]
            label = None if any(f is None for f in flags) else flags
            bad_col = next((c for c, f in zip(labels, flags) if f is None), None)
            reason = f"column {bad_col!r}: expected 0 or 1, got {row.get(bad_col)!r}"
        else:
            label = _label_list(raw[0], delimiter)
            reason = f"missing labels in column {labels[0]!r}"
        if label is None:
            out.bad.append((where, reason))
            continue
        out.texts.append(values)
        out.labels.append(label)
    out.bad.sort(key=lambda b: int(b[0].rsplit(":", 1)[1]))  # read- and parse-time rejects, in file order
    return out


# ---- splits ----

def resolve_text_splits(task: str, path: Path, val: Path | None, test: Path | None, *,
                        text_column: str | None, label_column: str | None, label_delimiter: str | None,
                        val_fraction: float, seed: int, max_bad_fraction: float) -> TextSplits:
    train_t = read_table(path, "--data")
    val_t = read_table(val, "--val") if val else None
    test_t = read_table(test, "--test") if test else None
    texts, labels, how = pick_columns(train_t, task, text_column, label_column)
    for t in (val_t, test_t):
        if t is not None:
            missing = [c for c in texts + labels if c.lower() not in lookup(t.columns)]
            if missing:
                raise UserError(f"{t.origin}: no column {missing[0]!r} (the training table has it; "
                                f"columns here: {t.columns})")
    delimiter = ""
    if task_kind(task) == "multilabel" and len(labels) == 1:
        delimiter = label_delimiter or guess_delimiter([train_t], labels[0])
    tables = [t for t in (train_t, val_t, test_t) if t is not None]
    parsed = []
    for t in tables:
        cols = lookup(t.columns)
        rows = parse_rows(t, task, [cols[c.lower()] for c in texts], [cols[c.lower()] for c in labels],
                          delimiter)
        check_bad(rows, t, max_bad_fraction)
        parsed.append(rows)
    skipped = [b for rows in parsed for b in rows.bad]
    warn_skipped(skipped)
    it = iter(parsed)
    train_rows = next(it)
    val_rows = next(it) if val_t else None
    test_rows = next(it) if test_t else None

    classes = class_names(task, labels, train_rows.labels, train_t)
    targets = targeter(task, classes, labels)
    record: dict[str, Any] = {"task": task, "text_columns": texts, "label_columns": labels,
                              "columns_chosen": how}
    if delimiter:
        record["label_delimiter"] = delimiter

    def split_of(rows: _Rows, origin: str) -> TextSplit:
        return TextSplit(rows.texts, [targets(x, origin) for x in rows.labels])

    train = split_of(train_rows, train_t.origin)
    if val_rows is not None:
        val_split = split_of(val_rows, val_t.origin)
        record["val"] = {"from": str(val)}
    else:
        if task_kind(task) == "classification":
            held = stratified_split([str(y) for y in train.targets], val_fraction, seed)
        else:
            held = random_split(len(train), val_fraction, seed)
        val_split = TextSplit([x for x, h in zip(train.texts, held) if h],
                              [y for y, h in zip(train.targets, held) if h])
        train = TextSplit([x for x, h in zip(train.texts, held) if not h],
                          [y for y, h in zip(train.targets, held) if not h])
        record["val"] = {"from": f"{'stratified ' if task_kind(task) == 'classification' else ''}random split of "
                                 f"{path}", "fraction": val_fraction, "seed": seed}
    if len(train) == 0 or len(val_split) == 0:
        raise UserError(f"--data {path}: too few usable rows to hold out a validation set; pass --val")
    test_split = split_of(test_rows, test_t.origin) if test_rows is not None else None
    record["train"] = {"from": str(path), "count": len(train)}
    record["val"]["count"] = len(val_split)
    record["test"] = {"from": str(test), "count": len(test_split)} if test_split else None
    return TextSplits(task, texts, labels, classes, train, val_split, test_split, record, skipped)


def read_labelled_texts(path: Path, task: str, text_columns: list[str], label_columns: list[str],
                        delimiter: str | None, classes: list[str], option: str = "--data",
                        max_bad_fraction: float = 0.05) -> tuple[TextSplit, list[tuple[str, str]]]:
    """A table read with a saved model's columns and labels (for evaluation): the split and skipped rows."""
    table = read_table(path, option)
    have = lookup(table.columns)
    missing = [c for c in text_columns + label_columns if c.lower() not in have]
    if missing:
        raise UserError(f"{table.origin}: no column {missing[0]!r} (the model was trained on columns "
                        f"{text_columns + label_columns}; columns here: {table.columns})")
    rows = parse_rows(table, task, [have[c.lower()] for c in text_columns],
                      [have[c.lower()] for c in label_columns], delimiter or _DELIMITERS[0])
    check_bad(rows, table, max_bad_fraction)
    target = targeter(task, classes, label_columns)
    return TextSplit(rows.texts, [target(y, table.origin) for y in rows.labels]), rows.bad


def read_texts(path: Path, text_columns: list[str], option: str) -> list[tuple[str, ...]]:
    """Texts to predict: a .txt file (one text per line) or a table with the model's text column(s)."""
    if path.suffix.lower() == ".txt":
        try:
            # split at newlines only: str.splitlines() would also split at form feeds and other separators
            lines = [line.rstrip("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]
        except UnicodeDecodeError as e:
            raise UserError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except FileNotFoundError:
            raise UserError(f"{option} {path}: no such file") from None
        except OSError as e:
            raise UserError(f"{option} {path}: cannot read it ({e.strerror})") from None
        if len(text_columns) > 1:
            raise UserError(f"{option} {path}: this model reads text pairs ({', '.join(text_columns)}); give a "
                            f"table with those columns")
        return [(line.strip(),) for line in lines if line.strip()]
    table = read_table(path, option)
    have = lookup(table.columns)
    missing = [c for c in text_columns if c.lower() not in have]
    if missing:
        raise UserError(f"{table.origin}: no text column {missing[0]!r} (columns: {table.columns})")
    out = []
    for line, row in table.rows:
        values = tuple(_text(row.get(have[c.lower()])) for c in text_columns)
        if any(v is None for v in values):
            raise UserError(f"{table.origin}, line {line}: empty text")
        out.append(values)
    if table.bad:
        where, reason = table.bad[0]
        raise UserError(f"{table.origin}, line {where.rsplit(':', 1)[1]}: {reason}")
    return out


def warn_skipped(skipped: list[tuple[str, str]]) -> None:
    """The unusable rows of every table read, in the log: the first few by place and reason (split.json has all)."""
    if skipped:
        log.warning("skipped %d unusable row(s):", len(skipped))
        for where, reason in skipped[:_MAX_LISTED]:
            log.warning("  %s: %s", where, reason)
        if len(skipped) > _MAX_LISTED:
            log.warning("  ... and %d more (all listed in split.json)", len(skipped) - _MAX_LISTED)
