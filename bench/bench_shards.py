"""Streaming from tar shards against reading the same images as files: the data pipeline alone, then one epoch
of training, side by side in one process.

The images: the undamaged files of a folder made by bench/make_big_folder.py (its zz-* files left out), as a
manifest for the file reader (data.ImageDataset, EpochBatches) and as WebDataset shards written by
tools/make_shards.py (--per-shard images each) for the stream (data.shards.ShardImages); validation: CIFAR-10
mini's test folder and the same files as shards. Both sides read from the OS page cache (every file and shard
read once before timing).

1. Pipeline: the training loader of each side with the same transform (the model's preprocessing at --size px,
   --augment), --workers workers, batch --batch; samples/s over the first --samples samples after one batch of
   warm-up, alternating sides, --rounds rounds (the median).
2. Training: `finetunekit.fit` for one epoch on each (timm:test_efficientnet, random init, --size px, batch
   --batch, --workers workers, --cache-images off): training samples/s from metrics.json, and the wall time
   (start-up included: the scan for the files, the label pass for the shards).

    flock /tmp/ftk-heavy.lock python bench/bench_shards.py --folder /work/bigdata/cifar-big
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
VAL = ROOT.parent / "shared" / "data" / "cifar10-mini" / "test"


def read_all(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def pipeline_rate(loader, samples: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: workers started, first batch
    n, started = 0, time.perf_counter()
    for x, _ in it:
        n += len(x)
        if n >= samples:
            break
    return n / (time.perf_counter() - started)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, required=True, help="a folder from bench/make_big_folder.py")
    ap.add_argument("--shards", type=Path, help="where the shards go (default: FOLDER-shards)")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--augment", default="light")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-fit", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("FINETUNEKIT_CPU_BF16", "0")
    import torch

    import finetunekit
    import make_shards
    from finetunekit.data import ImageDataset, Split, build_transform, make_loader
    from finetunekit.data.shards import make_shard_loader, resolve_shard_splits
    from finetunekit.data.transforms import Preprocessing

    shards = args.shards or args.folder.with_name(args.folder.name + "-shards")
    if not (shards / "train").is_dir():
        make_shards.write(args.folder / "train", shards / "train", prefix="train", per_shard=args.per_shard, seed=0,
                          exclude="zz-*")
        make_shards.write(VAL, shards / "val", prefix="val", per_shard=args.per_shard, seed=0,
                          classes=(shards / "train" / "classes.txt").read_text().split())
    classes, files = make_shards.class_files(args.folder / "train", exclude="zz-*")
    manifest = shards / "train.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *((str(p), c) for p, c in files)])
    read_all([p for p, _ in files] + sorted(shards.rglob("*.tar")))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    torch.set_num_threads(1)  # the loader side: the main process only collects batches

    pre = Preprocessing(input_size=args.size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875)
    tf = build_transform(pre, args.augment)
    split = resolve_shard_splits(shards / "train", shards / "val", None)
    index = {c: i for i, c in enumerate(split.classes)}
    folder_split = Split([str(p) for p, _ in files], [index[c] for _, c in files])
    rates: dict[str, list[float]] = {"files": [], "shards": []}
    for r in range(args.rounds):
        for side in rates:
            loader = make_loader(ImageDataset(folder_split, tf), args.batch, train=True, workers=args.workers,
                                 seed=r) if side == "files" else \
                make_shard_loader(split.train, split.classes, tf, args.batch, train=True, workers=args.workers, seed=r)
            rates[side].append(pipeline_rate(loader, args.samples))
            print(f"pipeline round {r + 1} {side}: {rates[side][-1]:.0f} samples/s", flush=True)
            del loader
    pipe = {side: statistics.median(v) for side, v in rates.items()}
    line = (f"SUMMARY shards: images={len(files)} shards={len(split.train.files)} at={commit} size={args.size} "
            f"augment={args.augment} batch={args.batch} workers={args.workers} cache=warm pipeline_samples_per_s: "
            f"files={pipe['files']:.0f} shards={pipe['shards']:.0f} ratio={pipe['shards'] / pipe['files']:.2f}")
    if not args.no_fit:
        torch.set_num_threads(2)
        common = {"model": {"name": "timm:test_efficientnet", "pretrained": False},
                  "train": {"epochs": 1, "batch_size": args.batch, "seed": 0, "strategy": "full"}, "quiet": True}
        opts = {"image_size": args.size, "num_workers": args.workers, "augment": args.augment, "cache_images": "off"}
        fits = {}
        for side, data in (("files", {"path": str(manifest), "val": str(VAL)}),
                           ("shards", {"path": str(shards / "train"), "val": str(shards / "val")})):
            out = shards.parent / f"bench-shards-run-{side}"
            run = finetunekit.fit({**common, "data": {**opts, **data}, "out": str(out), "overwrite": out.exists()})
            fits[side] = run.metrics
            print(f"fit {side}: {run.metrics['train_samples_per_s']:.0f} samples/s, "
                  f"wall {run.metrics['wall_seconds']:.0f}s, "
                  f"val accuracy {run.metrics['val']['accuracy']:.4f}", flush=True)
        line += (f" fit_samples_per_s: files={fits['files']['train_samples_per_s']:.0f} "
                 f"shards={fits['shards']['train_samples_per_s']:.0f} "
                 f"ratio={fits['shards']['train_samples_per_s'] / fits['files']['train_samples_per_s']:.2f} "
                 f"wall_s: files={fits['files']['wall_seconds']:.0f} shards={fits['shards']['wall_seconds']:.0f}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
