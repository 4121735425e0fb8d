"""Training throughput of `finetunekit fit` against a plain PyTorch loop, side by side in one process.

Same model (the built-in EfficientNet-Lite0, full fine-tune), same images, batch size, image size,
augmentation (the very same transform), loader settings and threads. The plain loop is the one the seed
guides write by hand: zero_grad, forward, cross-entropy, backward, clip, AdamW step, schedule step.
Rounds alternate (plain, finetunekit, plain, ...) so drift in machine speed hits both; the ratio is the
median of the per-round ratios. Only training steps are timed (finetunekit reports train-phase images/s;
validation is excluded from both).

    .venv/bin/python bench/bench_fit_vs_plain.py            # ~2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import finetunekit  # noqa: E402
from conftest import CIFAR, write_manifest  # noqa: E402
from finetunekit.data import ImageDataset, Split, build_transform, make_loader  # noqa: E402
from finetunekit.data.sources import read_labeled_files  # noqa: E402
from finetunekit.models import create_backbone  # noqa: E402


def plain_loop(manifest: Path, args) -> float:
    files = read_labeled_files(manifest, "--data")
    classes = sorted(set(files.labels))
    split = Split(files.paths, [classes.index(c) for c in files.labels])
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", len(classes))
    pre = backbone.preprocessing.with_size(args.image_size)
    loader = make_loader(ImageDataset(split, build_transform(pre, "light")), args.batch_size, train=True,
                         workers=args.workers, seed=0)
    model = backbone.module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader))
    model.train()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def finetunekit_fit(manifest: Path, val: Path, out: Path, args) -> float:
    result = finetunekit.fit({
        "data": {"path": str(manifest), "val": str(val), "image_size": args.image_size, "augment": "light",
                 "num_workers": args.workers},
        "model": {"name": "efficientnet_lite0"},
        "train": {"strategy": "full", "epochs": 1, "batch_size": args.batch_size},
        "out": str(out), "quiet": True})
    return result.metrics["train_samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=160, help="training images per class (10 classes)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = write_manifest(tmp / "train.csv", CIFAR / "train", args.per_class)
        val = write_manifest(tmp / "val.csv", CIFAR / "test", 5)
        ratios, plain_rates, ours_rates = [], [], []
        for i in range(args.rounds):
            plain = plain_loop(train, args)
            ours = finetunekit_fit(train, val, tmp / f"run{i}", args)
            plain_rates.append(plain)
            ours_rates.append(ours)
            ratios.append(ours / plain)
            print(f"round {i + 1}: plain {plain:.1f} img/s, finetunekit {ours:.1f} img/s, ratio {ours / plain:.3f}",
                  flush=True)
    print(f"SUMMARY fit-vs-plain: images={args.per_class * 10} size={args.image_size} batch={args.batch_size} "
          f"workers={args.workers} threads={torch.get_num_threads()} plain={statistics.median(plain_rates):.1f} "
          f"finetunekit={statistics.median(ours_rates):.1f} img/s ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
