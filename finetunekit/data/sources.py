"""Where labelled images come from: class folders or a CSV manifest, and how they split into train/val/test.

Everything here runs before training starts, so every problem is a one-line `UserError` naming the
option and file, and unreadable files are skipped, counted and listed (never a crash, never silent).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .images import scan_images
from .splits import (check_bad, class_names, class_sort_key, lookup, random_split, stratified_split,
                     targeter)
from .tables import guess_delimiter, parse_rows, read_table

log = logging.getLogger("finetunekit")

_VAL_NAMES = ("val", "valid", "validation")
_PATH_COLUMNS = ("path", "file", "filename", "image")
_LABEL_COLUMNS = ("label", "class", "target")


@dataclass
class LabeledFiles:
    """Image files with their class names, as read from one folder or manifest."""

    paths: list[str]
    labels: list[str]
    origin: str  # the option and path it came from, for messages: "--val data/val"
    declared: list[str] = field(default_factory=list)  # class folders, even empty ones


@dataclass
class Split:
    paths: list[str]
    labels: list[int]  # indices into Splits.classes

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Splits:
    classes: list[str]
    train: Split
    val: Split
    test: Split | None
    record: dict  # how the split was made, saved with the run
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable files


def read_labeled_files(path: Path, option: str) -> LabeledFiles:
    try:
        if path.is_dir():
            return _read_class_folders(path, option)
        if path.is_file():
            return _read_manifest(path, option)
    except PermissionError as e:  # a folder or manifest without read permission: never "empty"
        raise UserError(f"{option} {e.filename or path}: cannot read (permission denied)") from None
    raise UserError(f"{option} {path}: no such file or folder")


def _read_class_folders(root: Path, option: str) -> LabeledFiles:
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: class_sort_key(d.name))
    if not folders:
        raise UserError(f"{option} {root}: expected one sub-folder per class, found no sub-folders")
    paths, labels = [], []
    for folder in folders:
        files = sorted(_files_under(folder))
        if not files:
            raise UserError(f"{option} {root}: class folder '{folder.name}' is empty")
        paths += [str(p) for p in files]
        labels += [folder.name] * len(files)
    return LabeledFiles(paths, labels, f"{option} {root}", declared=[d.name for d in folders])


def _unreadable(error: OSError) -> None:
    if isinstance(error, PermissionError):
        raise error  # other failures (a folder removed meanwhile) pass, as they did under Path.rglob


def _files_under(folder: Path) -> list[Path]:
    """The files in `folder` and its sub-folders (symlinks to files count; hidden names and symlinked folders
    are skipped, as Path.rglob does). A folder it cannot list raises its PermissionError, where rglob passed
    over it in silence."""
    out = []
    for parent, dirs, names in os.walk(folder, onerror=_unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [p for n in names if not n.startswith(".") and (p := Path(parent) / n).is_file()]
    return out


def _read_manifest(path: Path, option: str) -> LabeledFiles:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = {c.strip().lower(): c for c in reader.fieldnames or []}
            path_col = next((columns[c] for c in _PATH_COLUMNS if c in columns), None)
            label_col = next((columns[c] for c in _LABEL_COLUMNS if c in columns), None)
            if path_col is None or label_col is None:
                raise UserError(f"{option} {path}: a manifest needs columns 'path' and 'label', "
                                f"found {list(columns) or 'no header'}")
            paths, labels = [], []
            first: dict[str, tuple[str, int]] = {}  # file -> (its label, the line that gave it)
            for row in reader:
                file, label = (row.get(path_col) or "").strip(), (row.get(label_col) or "").strip()
                if not file or not label:
                    raise UserError(f"{option} {path}, line {reader.line_num}: empty "
                                    f"{'path' if not file else 'label'}")
                p = Path(file)
                paths.append(str(p if p.is_absolute() else path.parent / p))
                labels.append(label)
                seen = first.setdefault(paths[-1], (label, reader.line_num))
                if seen[0] != label:  # one image, one class: which one is meant is for the user to say
                    raise UserError(f"{option} {path}, line {reader.line_num}: {file} is labelled {label!r} here "
                                    f"and {seen[0]!r} on line {seen[1]}; a single-label manifest gives each file one "
                                    f"label (for several labels per image: --task image-multilabel)")
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{option} {path}: malformed CSV: {e}") from None
    if not paths:
        raise UserError(f"{option} {path}: the manifest has no rows")
    return LabeledFiles(paths, labels, f"{option} {path}", declared=sorted(set(labels), key=class_sort_key))


def drop_unreadable(sets: list[LabeledFiles]) -> tuple[list[tuple[str, str]], int]:
    """Check every file once (data.images.scan_images); drop the unreadable ones from each set in place and log them.

    Returns ((path, reason) for each skipped file, the number of files scanned).
    """
    all_paths = [p for f in sets for p in f.paths]
    report = scan_images(all_paths)
    if report.bad:
        log.warning("skipped %d unreadable file(s) of %d:", len(report.bad), len(all_paths))
        for p, reason in report.bad:
            log.warning("  skipped %s: %s", p, reason)
    converted = {m: n for m, n in report.modes.items() if m != "RGB"}
    if converted:
        log.debug("image modes converted to RGB: %s", ", ".join(f"{n} {m}" for m, n in converted.items()))
    readable = dict(zip(all_paths, report.ok))
    for f in sets:
        keep = [i for i, p in enumerate(f.paths) if readable[p]]
        f.paths, f.labels = [f.paths[i] for i in keep], [f.labels[i] for i in keep]
    return report.bad, len(all_paths)


def labeled_split(f: LabeledFiles, classes: list[str], known_as: str) -> Split:
    """`f` as class indices; labels outside `classes`, or no readable file left, are errors naming `f`."""
    unknown = sorted(set(f.labels) - set(classes), key=class_sort_key)
    if unknown:
        raise UserError(f"{f.origin}: label{'s' if len(unknown) > 1 else ''} {unknown} not in {known_as} "
                        f"(classes: {classes})")
    if not f.paths:
        raise UserError(f"{f.origin}: no readable images")
    index = {c: i for i, c in enumerate(classes)}
    return Split(f.paths, [index[c] for c in f.labels])


def train_folder(path: Path) -> Path:
    """Where the training images of --data are: its train/ folder when it has one, else itself."""
    return path / "train" if path.is_dir() and (path / "train").is_dir() else path


def resolve_splits(path: Path | None, val: Path | None, test: Path | None, val_fraction: float,
                   seed: int, max_bad_fraction: float) -> Splits:
    if path is None:
        raise UserError("--data: required: a folder of class folders, a folder with train/ and val/, "
                        "or a CSV manifest path,label")
    train_path = train_folder(path)
    if train_path != path:
        val = val or next((path / n for n in _VAL_NAMES if (path / n).is_dir()), None)
        test = test or ((path / "test") if (path / "test").is_dir() else None)
    train = read_labeled_files(train_path, "--data")
    val_files = read_labeled_files(val, "--val") if val else None
    test_files = read_labeled_files(test, "--test") if test else None

    every = [f for f in (train, val_files, test_files) if f is not None]
    skipped, total = drop_unreadable(every)
    if len(skipped) > max_bad_fraction * total:
        p, reason = skipped[0]
        raise UserError(f"--data {path}: {len(skipped)} of {total} image files cannot be read, "
                        f"more than --max-bad-fraction {max_bad_fraction} (first: {p}: {reason})")

    counts = Counter(train.labels)
    for name in train.declared:
        if not counts[name]:
            raise UserError(f"{train.origin}: class '{name}' has no readable images")
    classes = sorted(counts, key=class_sort_key)
    if len(classes) < 2:
        raise UserError(f"{train.origin}: found {len(classes)} class{'es' if not classes else ''} "
                        f"{classes}; classification needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    val_split = labeled_split(val_files, classes, "the training data") if val_files is not None else None
    test_split = labeled_split(test_files, classes, "the training data") if test_files is not None else None

    if val_split is not None:
        train_split = Split(train.paths, [index[c] for c in train.labels])
        record = {"val": {"from": str(val)}}
    else:
        held = stratified_split(train.labels, val_fraction, seed)
        pairs = list(zip(train.paths, train.labels, held))
        train_split = Split([p for p, _, h in pairs if not h], [index[c] for _, c, h in pairs if not h])
        val_split = Split([p for p, _, h in pairs if h], [index[c] for _, c, h in pairs if h])
        record = {"val": {"from": f"stratified split of {train_path}", "fraction": val_fraction,
                          "seed": seed, "files": val_split.paths}}
    record.update(train={"from": str(train_path), "count": len(train_split)},
                  test={"from": str(test), "count": len(test_split)} if test_split else None)
    record["val"]["count"] = len(val_split)
    return Splits(classes, train_split, val_split, test_split, record, skipped)


def resolve_table_splits(task: str, path: Path | None, val: Path | None, test: Path | None, *,
                         label_column: str | None, label_delimiter: str | None, val_fraction: float, seed: int,
                         max_bad_fraction: float) -> Splits:
    """image-multilabel and image-regression: a table (CSV/TSV/JSONL/Parquet) with a path column and label
    column(s) read by the text-table rules (delimited names, a JSON list or 0/1 columns; a number).
    Unreadable images are skipped like bad rows; a validation split is a seeded random one."""
    if path is None or path.is_dir():
        raise UserError(f"--data {path}: --task {task} reads a table (CSV, TSV, JSONL or Parquet) with a path "
                        f"column and label column(s)")
    tables = [read_table(p, opt) for p, opt in ((path, "--data"), (val, "--val"), (test, "--test")) if p]
    have = lookup(tables[0].columns)
    path_col = next((have[c] for c in _PATH_COLUMNS if c in have), None)
    if path_col is None:
        raise UserError(f"{tables[0].origin}: no path column (one of {', '.join(_PATH_COLUMNS)}) among "
                        f"{tables[0].columns}")
    if label_column:
        labels = [s.strip() for s in label_column.split(",") if s.strip()]
        missing = [c for c in labels if c.lower() not in have]
        if missing:
            raise UserError(f"--label-column {label_column}: {tables[0].origin} has no column {missing[0]!r} "
                            f"(columns: {tables[0].columns})")
        labels = [have[c.lower()] for c in labels]
    else:
        found = next((have[c] for c in ("labels", "label", "target", "value", "score", "y") if c in have), None)
        if found is None:
            raise UserError(f"{tables[0].origin}: no label column found among {tables[0].columns}; name it with "
                            f"--label-column")
        labels = [found]
    delimiter = label_delimiter or guess_delimiter(tables[:1], labels[0]) if task.endswith("multilabel") else ""
    read = [_image_rows(t, task, path_col, labels, delimiter, max_bad_fraction) for t in tables]
    skipped = [b for _, _, bad in read for b in bad] + _drop_checked([f for f, _, _ in read], max_bad_fraction, path)
    classes = class_names(task, labels, [read[0][1][i] for i in read[0][0].labels], tables[0])
    target = targeter(task, classes, labels)
    splits = [Split(f.paths, [target(raw[i], t.origin) for i in f.labels]) for (f, raw, _), t in zip(read, tables)]
    for (f, raw, _), t in zip(read, tables):
        _warn_relabelled(f.paths, [raw[i] for i in f.labels], t.origin, delimiter or "|")
    train, rest = splits[0], splits[1:]
    val_split = rest.pop(0) if val else None
    test_split = rest.pop(0) if test else None
    record: dict = {"task": task, "path_column": path_col, "label_columns": labels}
    if delimiter:
        record["label_delimiter"] = delimiter
    if val_split is None:
        held = random_split(len(train), val_fraction, seed)
        val_split = Split([p for p, h in zip(train.paths, held) if h], [y for y, h in zip(train.labels, held) if h])
        train = Split([p for p, h in zip(train.paths, held) if not h],
                      [y for y, h in zip(train.labels, held) if not h])
        record["val"] = {"from": f"random split of {path}", "fraction": val_fraction, "seed": seed,
                         "files": val_split.paths}
    else:
        record["val"] = {"from": str(val)}
    record["val"]["count"] = len(val_split)
    record.update(train={"from": str(path), "count": len(train)},
                  test={"from": str(test), "count": len(test_split)} if test_split else None)
    return Splits(classes, train, val_split, test_split, record, skipped)


def _image_rows(t, task: str, path_col: str, labels: list[str], delimiter: str, max_bad_fraction: float):
    """(LabeledFiles whose labels are row numbers, raw label per row) of one image table."""
    cols = lookup(t.columns)
    if any(c.lower() not in cols for c in [path_col] + labels):
        raise UserError(f"{t.origin}: needs the columns {[path_col] + labels} (columns here: {t.columns})")
    rows = parse_rows(t, task, [cols[path_col.lower()]], [cols[c.lower()] for c in labels], delimiter)
    check_bad(rows, t, max_bad_fraction)
    paths = [str(p if (p := Path(x[0])).is_absolute() else t.path.parent / p) for x in rows.texts]
    return LabeledFiles(paths, list(range(len(paths))), t.origin), rows.labels, rows.bad


def _warn_relabelled(paths: list[str], raw: list, origin: str, delimiter: str) -> None:
    """A multi-label or regression table that lists one file in several rows with different labels: a warning
    (each row stays a sample of its own; list a file once, with all its labels, to mean one sample)."""
    first: dict[str, Any] = {}
    differing = []
    for p, label in zip(paths, raw):
        if first.setdefault(p, label) != label:
            differing.append((p, first[p], label))
    if differing:
        p, a, b = (x if isinstance(x, str) else delimiter.join(map(str, x)) if isinstance(x, list) else str(x)
                   for x in differing[0])
        files = len({d[0] for d in differing})
        log.warning("warning: %s: %s is listed with the labels %r and %r%s; each row trains as a sample of its own "
                    "(to give one image several labels, list it once with its labels delimited)", origin, p, a, b,
                    f" ({files} files listed with differing labels)" if files > 1 else "")


def _drop_checked(sets: list[LabeledFiles], max_bad_fraction: float, where: Path) -> list[tuple[str, str]]:
    """drop_unreadable, then stop past --max-bad-fraction."""
    skipped, total = drop_unreadable(sets)
    if len(skipped) > max_bad_fraction * total:
        p, reason = skipped[0]
        raise UserError(f"--data {where}: {len(skipped)} of {total} image files cannot be read, more than "
                        f"--max-bad-fraction {max_bad_fraction} (first: {p}: {reason})")
    return skipped


def read_table_split(task: str, path: Path, path_column: str, label_columns: list[str], delimiter: str | None,
                     classes: list[str], max_bad_fraction: float = 0.05) -> tuple[Split, int]:
    """One image table read with a saved model's columns and classes (for evaluate): the split, skipped."""
    t = read_table(path, "--data")
    files, raw, bad = _image_rows(t, task, path_column, label_columns, delimiter or "|", max_bad_fraction)
    skipped = _drop_checked([files], max_bad_fraction, path)
    target = targeter(task, classes, label_columns)
    return Split(files.paths, [target(raw[i], t.origin) for i in files.labels]), len(skipped) + len(bad)
