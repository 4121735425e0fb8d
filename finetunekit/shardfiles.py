"""WebDataset tar shards on disk: which files a `--data` names, and one cheap pass over their label entries
(torch-free: preflight checks the names before anything heavy is imported).

A shard is a tar file whose members are grouped into samples by key (the member's name up to the first dot
of its base name: `000123.jpg` and `000123.cls` are one sample), WebDataset's convention. A sample has one
image member (jpg, jpeg, png, webp, bmp, ppm, tif, tiff, gif) and one label member: `.cls` (a class index,
or a class name), `.txt` (a class name) or `.json` (an object with "label", "cls" or "class"). Classes: the
file `classes.txt` beside the shards (one name a line: line i is class index i) when there is one; else the
names found in the label pass, sorted as class folders are.

`--data` takes a shard file, a brace pattern (`shards/train-{000000..000009}.tar`, `{a,b}` lists too), or a
folder of .tar files; a folder with train/ (and val/, test/) folders of .tar files gives each split its own.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
LABEL_EXTS = ("cls", "txt", "json")
EXPECTED = ("expected WebDataset .tar shards: a .tar file, a pattern like train-{000000..000009}.tar, or a folder "
            "of .tar files")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def is_shards(path: Path | str | None) -> bool:
    """Whether `--data`/`--val`/`--test` names shards (a .tar, a brace pattern, or a folder holding .tar files or
    a train/ folder of them), not image files."""
    if path is None:
        return False
    p = Path(path)
    if p.suffix == ".tar" or "{" in p.name:
        return True
    if p.is_dir():
        return any(p.glob("*.tar")) or (p / "train").is_dir() and any((p / "train").glob("*.tar"))
    return False


def expand(pattern: str) -> list[str]:
    """A brace pattern -> its names in order, the leftmost brace outermost: {000..009} keeps the width of its
    first number; {a,b} lists."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        names = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        names = m.group(1).split(",")
    return [x for n in names for x in expand(pattern[:m.start()] + n + pattern[m.end():])]


def shard_files(path: Path | str, option: str) -> list[Path]:
    """The shard files `path` names, in order; a one-line UserError when there are none or one is missing."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.tar"))
        if not files:
            raise UserError(f"{option} {p}: no .tar files in this folder ({EXPECTED})")
        return files
    files = [Path(f) for f in expand(str(p))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        which = "no such shard file" if len(files) == 1 else \
            f"{len(missing)} of {len(files)} shard files missing, first"
        raise UserError(f"{option} {p}: {which}: {missing[0]} ({EXPECTED})")
    return files


def split_folders(path: Path) -> dict[str, Path] | None:
    """{'train': .., 'val': .., 'test': ..} for a folder with train/ (val/ or valid/ or validation/, test/)
    folders of .tar shards; None otherwise."""
    if not (path.is_dir() and (path / "train").is_dir() and any((path / "train").glob("*.tar"))):
        return None
    out = {"train": path / "train"}
    val = next((path / n for n in ("val", "valid", "validation") if (path / n).is_dir()), None)
    if val is not None:
        out["val"] = val
    if (path / "test").is_dir():
        out["test"] = path / "test"
    return out


class NotATar(ValueError):
    pass


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def tar_members(f, wanted):
    """(name, bytes or None) for each regular file of the tar stream `f` (an open binary file), in order: the
    bytes of the members for which `wanted(name)` is true, None (skipped by seeking) for the others. The
    ustar, pax (path, size) and GNU long-name forms are read; a header whose checksum is wrong raises
    NotATar. (The standard library's tarfile parses every header in Python objects: 0.3 ms a member of a
    WebDataset shard, more than decoding a small JPEG; this reads them at a few microseconds each.)"""
    long_name = pax = None
    while True:
        header = f.read(512)
        if len(header) < 512 or header == bytes(512):
            return
        try:
            checksum, size = _octal(header[148:156]), _octal(header[124:136])
        except ValueError:
            raise NotATar("not a tar header") from None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counted as spaces
            raise NotATar("bad tar header checksum")
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        if pax:
            name, size = pax.get("path", name), int(pax.get("size", size))
        if long_name is not None:
            name = long_name
        padded = -(-size // 512) * 512
        if kind in (b"x", b"L"):
            data = f.read(padded)[:size]
            if kind == b"x":
                pax = _pax(data)
            else:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        long_name = pax = None
        if kind in (b"0", b"\0", b"7") and wanted(name):
            data = f.read(padded)
            if len(data) < size:
                raise NotATar(f"{name}: cut short")
            yield name, data[:size]
        else:
            f.seek(padded, 1)
            if kind in (b"0", b"\0", b"7"):
                yield name, None


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def key_and_ext(name: str) -> tuple[str, str]:
    """WebDataset's grouping: '{dir}/000123.seg.jpg' -> ('{dir}/000123', 'seg.jpg')."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def parse_label(ext: str, data: bytes, where: str):
    """The label in a label member: an int (a class index) or a str (a class name)."""
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            raise UserError(f"{where}: not JSON") from None
        value = next((obj[k] for k in ("label", "cls", "class") if isinstance(obj, dict) and k in obj), None)
        if value is None:
            raise UserError(f"{where}: expected a JSON object with 'label', 'cls' or 'class'")
        return value if isinstance(value, int) else str(value)
    if ext == "cls" and re.fullmatch(r"-?\d+", text):
        return int(text)
    if not text:
        raise UserError(f"{where}: empty label")
    return text


@dataclass
class ShardLabels:
    """What the label pass found in one set of shards."""

    files: list[Path]
    counts: list[int]  # samples per shard
    labels: list = field(default_factory=list)  # per sample, in shard order: int (class index) or str (name)

    @property
    def total(self) -> int:
        return sum(self.counts)


def read_labels(files: list[Path], option: str) -> ShardLabels:
    """One pass over the shards' headers, reading only the label members (image members are skipped by
    seeking, never read)."""
    out = ShardLabels(files, [])
    for f in files:
        samples: dict[str, dict] = {}
        try:
            with open(f, "rb") as stream:
                for name, data in tar_members(stream, lambda n: n.rpartition(".")[2].lower() in LABEL_EXTS):
                    key, ext = key_and_ext(name)
                    entry = samples.setdefault(key, {})
                    last = ext.rpartition(".")[2]
                    if last in IMAGE_EXTS:
                        entry["image"] = True
                    elif last in LABEL_EXTS and "label" not in entry:
                        entry["label"] = parse_label(last, data, f"{option} {f}: sample {key}")
        except (NotATar, ValueError, OSError) as e:
            raise UserError(f"{option} {f}: not a readable tar file ({e}) ({EXPECTED})") from None
        n = 0
        for key, entry in samples.items():
            if "image" not in entry:
                continue  # a sample of other members only (metadata): not an image sample
            if "label" not in entry:
                raise UserError(f"{option} {f}: sample {key} has no label (.cls, .txt or .json)")
            out.labels.append(entry["label"])
            n += 1
        out.counts.append(n)
    if not out.total:
        raise UserError(f"{option} {files[0] if len(files) == 1 else files[0].parent}: no image samples in "
                        f"{len(files)} shard file(s) ({EXPECTED})")
    return out


def declared_classes(files: list[Path]) -> list[str] | None:
    """classes.txt beside the shards (one name a line), or None."""
    f = files[0].parent / "classes.txt"
    if not f.is_file():
        return None
    return [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


class ClassIndex:
    """A raw label -> its class index: a name looked up in `classes`; an integer that is not itself a class name
    indexes `classes` (classes.txt line numbers). None for a label outside the classes. Picklable (loader
    workers)."""

    def __init__(self, classes: list[str]):
        self.classes, self.index = list(classes), {c: i for i, c in enumerate(classes)}

    def __call__(self, raw) -> int | None:
        i = raw if isinstance(raw, int) and str(raw) not in self.index else self.index.get(str(raw))
        return i if i is not None and 0 <= i < len(self.classes) else None


def class_index(labels: list, classes: list[str] | None, origin: str) -> tuple[list[str], list[int]]:
    """(the class names, each sample's class index). Without `classes` (classes.txt, or the training set's),
    the names found (integers name themselves: '0', '1', ...), sorted as class folders are."""
    from .data.splits import class_sort_key  # imported here: finetunekit.data imports torch

    if classes is None:
        classes = sorted({str(x) for x in labels}, key=class_sort_key)
    lookup = ClassIndex(classes)
    out = []
    for x in labels:
        i = lookup(x)
        if i is None:
            raise UserError(f"{origin}: label {x!r} not among the classes ({classes})")
        out.append(i)
    return classes, out
