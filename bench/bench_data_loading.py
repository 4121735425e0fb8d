"""Data loading alone: finetunekit's image pipeline against torchvision ImageFolder + PIL transforms.

Both sides produce the same batches from CIFAR-10 mini's training folder at 128 px: a random resized crop
(scale 0.35-1, finetunekit's `light` preset), a random horizontal flip, and normalization to float32
[B, 3, 128, 128] (`--augment none`: the validation pipeline instead, resize to 146 px and centre crop);
same batch size, same number of loader worker processes, same threads; no model, nothing else. Each round times the second of two passes over the images (loader
workers persistent, so their start-up is not timed on either side). Rounds alternate between the sides.

- torchvision: `ImageFolder` + `transforms.Compose([RandomResizedCrop, RandomHorizontalFlip, ToTensor,
  Normalize])`, a shuffling DataLoader: what the seed guides write.
- finetunekit: the decoded-image cache (`--cache-images`, finetunekit/data/decoded.py), as `fit` uses it:
  pixels read from the memory-mapped cache, crop (timm's parameters, torch's antialiased uint8 resize) and
  flip on uint8 tensors with a per-sample seed in the workers, uint8 batches handed over, and each batch
  normalized in the main process (where fit's loop normalizes it; on a GPU, after the transfer). The
  one-off build of the cache is timed and reported separately (it happens once per data set and image
  size, and later runs reuse it).

    .venv/bin/python bench/bench_data_loading.py            # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "cifar10-mini" / "train"


def torchvision_side(args) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms as T

    if args.augment == "light":
        geometry = [T.RandomResizedCrop(args.image_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
    else:  # timm's eval geometry at crop_pct 0.875, as finetunekit's validation transform
        geometry = [T.Resize(int(args.image_size / 0.875)), T.CenterCrop(args.image_size)]
    tf = T.Compose([*geometry, T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    ds = datasets.ImageFolder(str(DATA), transform=tf)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    return _images_per_s(loader)


def finetunekit_datasets(args):
    from finetunekit.checkpoint import content_hash
    from finetunekit.data import ImageDataset, Preprocessing, Split
    from finetunekit.data.decoded import decoded_datasets

    classes = sorted(p.name for p in DATA.iterdir() if p.is_dir())
    files = [(str(f), i) for i, c in enumerate(classes) for f in sorted((DATA / c).iterdir())]
    split = Split([f for f, _ in files], [i for _, i in files])
    content = content_hash({"train": [Path(p) for p in split.paths]})[1]["train"]  # fit's key
    pre = Preprocessing(input_size=args.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    import timm.data  # noqa: F401 - imported before the clock starts: the build is what is timed
    started = time.perf_counter()
    ds = decoded_datasets({"train": ImageDataset(split, None)}, {"train": content}, mode="on", epochs=1,
                          pre=pre, augment=args.augment, rotate=0.0, elastic=0.0, vflip=False)["train"]
    return ds, pre, time.perf_counter() - started


def finetunekit_side(args, ds, pre, round_: int) -> float:
    from finetunekit.data import make_loader
    from finetunekit.data.decoded import Normalize

    loader = make_loader(ds, args.batch_size, train=True, workers=args.workers, seed=round_)
    return _images_per_s(loader, Normalize(pre.mean, pre.std))  # as fit's loop: uint8 batches, normalized


def _images_per_s(loader, normalize=None) -> float:
    """Steady state: the second of two passes (persistent workers, already started and warm)."""
    for epoch in range(2):
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        seen, start = 0, time.perf_counter()
        for x, _ in loader:
            x = normalize(x) if normalize is not None else x
            assert x.dtype == torch.float32 and x.shape[1] == 3
            seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--augment", choices=("light", "none"), default="light",
                    help="light: the training pipeline (random resized crop + flip); none: the validation "
                         "pipeline (resize + centre crop)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="bench-data-cache-"))
    os.environ["FINETUNEKIT_CACHE"] = str(cache)  # a cold cache: its build is timed below
    import logging

    logging.getLogger("finetunekit").addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("finetunekit").setLevel(logging.INFO)
    try:
        ds, pre, build_s = finetunekit_datasets(args)
        print(f"cache build (once): {len(ds)} images in {build_s:.1f}s ({len(ds) / build_s:.0f} images/s)")
        ratios, ours, theirs = [], [], []
        for r in range(args.rounds):
            a = torchvision_side(args) if r % 2 == 0 else finetunekit_side(args, ds, pre, r)
            b = finetunekit_side(args, ds, pre, r) if r % 2 == 0 else torchvision_side(args)
            tv, fk = (a, b) if r % 2 == 0 else (b, a)
            theirs.append(tv)
            ours.append(fk)
            ratios.append(fk / tv)
            print(f"round {r + 1}: torchvision ImageFolder {tv:.0f} images/s, finetunekit {fk:.0f} images/s, "
                  f"ratio {fk / tv:.2f}", flush=True)
        print(f"SUMMARY data loading, {'training' if args.augment == 'light' else 'validation'} pipeline "
              f"({len(ds)} CIFAR-10 mini images, {args.image_size} px, batch "
              f"{args.batch_size}, {args.workers} workers): finetunekit {statistics.median(ours):.0f} vs "
              f"torchvision ImageFolder + PIL {statistics.median(theirs):.0f} images/s, ratio "
              f"{statistics.median(ratios):.2f}x (cache build, once: {build_s:.1f}s)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
