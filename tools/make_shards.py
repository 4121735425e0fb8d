"""Write a folder of class folders as WebDataset tar shards (webdataset's ShardWriter: the `shards` extra).

Each image file goes in unchanged (its bytes, under its own extension) with a `.cls` member holding its class
index; the samples are shuffled (seeded) before they are written, since a stream only shuffles within its
buffer. `classes.txt` beside the shards lists the class names, line i = class index i.

    python tools/make_shards.py ../shared/data/cifar10-mini/train shards/train --prefix train --per-shard 1000
    python tools/make_shards.py ../shared/data/cifar10-mini/test shards/val --prefix val --classes-from shards/train

--classes-from takes the class list of earlier shards (a validation set without some class keeps its indices).
An existing output folder with .tar files is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import fnmatch
import random
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")


def class_files(root: Path, exclude: str | None = None) -> tuple[list[str], list[tuple[Path, str]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(p, c) for c in classes for p in sorted((root / c).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES
             and not (exclude and fnmatch.fnmatch(p.name, exclude))]
    return classes, files


def write(src: Path, out: Path, *, prefix: str, per_shard: int, seed: int, classes: list[str] | None = None,
          overwrite: bool = False, exclude: str | None = None) -> list[Path]:
    import webdataset as wds

    found, files = class_files(src, exclude)
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SystemExit(f"{src}: classes {unknown} not in the class list {classes}")
    if out.is_dir() and any(out.glob("*.tar")) and not overwrite:
        raise SystemExit(f"{out}: has .tar files already (--overwrite replaces them)")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    random.Random(seed).shuffle(files)
    index = {c: i for i, c in enumerate(classes)}
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (path, label) in enumerate(files):
            sink.write({"__key__": f"{i:07d}", path.suffix.lower().lstrip("."): path.read_bytes(),
                        "cls": str(index[label]).encode()})
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    return sorted(out.glob("*.tar"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a folder of class folders")
    ap.add_argument("out", type=Path, help="the folder the shards go to")
    ap.add_argument("--prefix", default="shard")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes-from", type=Path, help="a shard folder whose classes.txt gives the class list")
    ap.add_argument("--exclude", help="leave out files whose name matches this pattern (zz-*)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    classes = None
    if args.classes_from:
        classes = (args.classes_from / "classes.txt").read_text(encoding="utf-8").split()
    shards = write(args.src, args.out, prefix=args.prefix, per_shard=args.per_shard, seed=args.seed,
                   classes=classes, overwrite=args.overwrite, exclude=args.exclude)
    print(f"{len(shards)} shard(s) in {args.out}: {shards[0].name} .. {shards[-1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
