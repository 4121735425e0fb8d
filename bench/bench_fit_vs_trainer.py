"""Full fine-tune throughput of `finetunekit fit` against the Hugging Face Trainer on a timm image model.

Both sides train the built-in EfficientNet-Lite0 (timm's `tf_efficientnet_lite0` with offline ImageNet
weights, a new 10-class head, every parameter trained) on the same CIFAR-10 mini images, with the same
batch size, image size, epochs, AdamW (lr 1e-3, weight decay 0.05), cosine schedule to 0 without warmup,
gradient clipping at 1.0, cross-entropy with label smoothing 0.1, seed, threads, data-loading workers and
transform (finetunekit's own `build_transform(preprocessing, "light")`: random resized crop + flip).
Both drop a last partial batch, so both train the same number of steps.

- finetunekit: the real `finetunekit fit` command line (`finetunekit.cli.run`, in-process so that the
  thread count can be set), with `--warmup 0 --min-lr-ratio 0 --checkpoint-every epoch` and its defaults
  otherwise. It needs a validation set: a small fixed one (`--val-images`, default 200). Where the CLI
  has `--cache-images` (a decoded-image cache, on by default from 2 epochs), it gets `--cache-images off`,
  so that both sides decode the JPEGs and run the same PIL transform every epoch; `--fit-args` appends
  any other flags (they win).
- Hugging Face Trainer: the same nn.Module (`finetunekit.models.create_backbone`) inside a small wrapper
  whose forward(pixel_values, labels) returns {"loss", "logits"}; a torch Dataset yielding
  {"pixel_values", "labels"} (files read with finetunekit's `load_rgb`); the default collator;
  no evaluation, no saving, no logging during the run, no progress bar, `use_cpu=True`. Everything else
  is the Trainer's default, its optimizer included (fused AdamW on torch >= 2.8; `--trainer-optim`).

What is timed: training steps only, epoch by epoch, from the start of the epoch's pass over the loader
(before the loader's iterator is created, so worker start-up is in) to the end of its last step; images/s
is the mean over epochs of (images trained in the epoch / epoch seconds). finetunekit measures this itself
(`train_samples_per_s` in the run's metrics.json; validation and checkpoints after the epoch are outside
it). On the Trainer side a TrainerCallback takes the same timestamps (on_epoch_begin, which fires right
before the Trainer creates the epoch's iterator, and on_epoch_end, right after the last step) and the
wrapper counts the images it trained. The Trainer's own `train_samples_per_second` is printed beside it
for reference: it times from after model/optimizer preparation to the end of `train()`, so it also
counts the last bookkeeping, and for several epochs the time between epochs; and it counts every image of
the dataset, also those of a dropped last partial batch (200 images at batch 32 train 192).

Each side runs in its own subprocess (one process tree, nothing shared); with `--rounds N` the order
alternates (Trainer first in odd rounds). The summary is the mean over rounds of each side.

    .venv/bin/python bench/bench_fit_vs_trainer.py     # ~3-4 minutes on 2 CPU cores (2 rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet_lite0"


def fit_argv(args) -> list[str]:
    """The `finetunekit fit` command line of the finetunekit side."""
    from finetunekit.config import leaf_fields

    argv = ["fit", "--data", args.train_csv, "--val", args.val_csv, "--model", MODEL, "--strategy", "full",
            "--image-size", str(args.image_size), "--augment", "light", "--num-workers", str(args.workers),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--weight-decay", str(args.weight_decay), "--optimizer", "adamw", "--scheduler", "cosine",
            "--warmup", "0", "--min-lr-ratio", "0", "--clip-grad", "1.0", "--label-smoothing", "0.1",
            "--seed", "0", "--cpu", "--checkpoint-every", "epoch", "--quiet", "--out", args.out]
    if "--cache-images" in {flag for _, flag, _ in leaf_fields()}:
        argv += ["--cache-images", "off"]  # the same transform as the Trainer's, on JPEGs decoded every epoch
    return argv + shlex.split(args.fit_args)  # last: they win


def run_finetunekit(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from finetunekit.cli import run

    if run(fit_argv(args)) != 0:
        raise SystemExit("finetunekit fit failed")
    metrics = json.loads((Path(args.out) / "metrics.json").read_text(encoding="utf-8"))
    return {"images_per_s": metrics["train_samples_per_s"], "train_seconds": metrics["train_seconds"],
            "threads": torch.get_num_threads()}


def run_trainer(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from finetunekit.data import build_transform, load_rgb
    from finetunekit.data.sources import read_labeled_files
    from finetunekit.models import create_backbone

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    files = read_labeled_files(Path(args.train_csv), "--data")
    classes = sorted(set(files.labels))
    labels = [classes.index(c) for c in files.labels]

    class Images(Dataset):
        def __init__(self, paths, labels, transform):
            self.paths, self.labels, self.transform = paths, labels, transform

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return {"pixel_values": self.transform(load_rgb(self.paths[i])), "labels": self.labels[i]}

    class Classifier(torch.nn.Module):
        """What the Trainer expects of a model: forward(**batch) -> {"loss", "logits"}."""

        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net, self.seen = net, 0

        def forward(self, pixel_values, labels=None):
            logits = self.net(pixel_values)
            if labels is None:
                return {"logits": logits}
            if self.training:
                self.seen += len(labels)
            return {"loss": F.cross_entropy(logits.float(), labels, label_smoothing=0.1), "logits": logits}

    class EpochTimer(TrainerCallback):
        def __init__(self, model: Classifier):
            self.model, self.rates, self.seconds = model, [], 0.0

        def on_epoch_begin(self, *_, **__):
            self.seen, self.start = self.model.seen, time.perf_counter()

        def on_epoch_end(self, *_, **__):
            seconds = time.perf_counter() - self.start
            self.seconds += seconds
            self.rates.append((self.model.seen - self.seen) / seconds)

    torch.manual_seed(0)
    backbone = create_backbone(MODEL, len(classes))
    pre = backbone.preprocessing.with_size(args.image_size)
    train = Images(files.paths, labels, build_transform(pre, "light"))
    model = Classifier(backbone.module)
    timer = EpochTimer(model)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="cosine", warmup_steps=0,
            max_grad_norm=1.0, eval_strategy="no", save_strategy="no",
            logging_steps=10**9, report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=args.workers, dataloader_persistent_workers=args.workers > 0,
            dataloader_drop_last=len(train) > args.batch_size,
            **({"optim": args.trainer_optim} if args.trainer_optim else {}))
        trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=[timer])
        stats = trainer.train().metrics
    return {"images_per_s": sum(timer.rates) / len(timer.rates), "train_seconds": timer.seconds,
            "own_images_per_s": stats["train_samples_per_second"], "threads": torch.get_num_threads(),
            "optim": str(getattr(targs.optim, "value", targs.optim))}


def run_side(side: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--side", side], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
        raise SystemExit(f"the {side} side failed (exit code {out.returncode})")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1600, help="training images, the same number per class (10)")
    p.add_argument("--val-images", type=int, default=200, help="finetunekit's validation images (not timed)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes (both sides)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides")
    p.add_argument("--trainer-optim", default=None,
                   help="the Trainer's `optim`; default: its own default (adamw_torch_fused on torch >= 2.8)")
    p.add_argument("--fit-args", default="", help="extra `finetunekit fit` flags, appended last (they win), "
                   "e.g. \"--cache-images auto\"")
    p.add_argument("--rounds", type=int, default=2)
    # set by the parent for each child
    p.add_argument("--side", choices=("trainer", "finetunekit"), help=argparse.SUPPRESS)
    p.add_argument("--train-csv", help=argparse.SUPPRESS)
    p.add_argument("--val-csv", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        result = (run_trainer if args.side == "trainer" else run_finetunekit)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    stray = os.environ.get("FINETUNEKIT_CACHE")
    from conftest import CIFAR, write_manifest  # noqa: E402

    if os.environ.get("FINETUNEKIT_CACHE") != stray:  # conftest made an empty cache folder of its own
        Path(os.environ["FINETUNEKIT_CACHE"]).rmdir()

    if args.images % 10 or args.val_images % 10:
        p.error("--images and --val-images: multiples of 10 (an equal number per class)")
    common = sys.argv[1:]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-fit-vs-trainer-") as tmp:
        tmp = Path(tmp)
        os.environ["FINETUNEKIT_CACHE"] = str(tmp / "cache")  # the children's: nothing cached from earlier runs
        train = write_manifest(tmp / "train.csv", CIFAR / "train", args.images // 10)
        val = write_manifest(tmp / "val.csv", CIFAR / "test", args.val_images // 10)
        ours_cmd = fit_argv(argparse.Namespace(**{**vars(args), "train_csv": str(train), "val_csv": str(val),
                                                  "out": str(tmp / "run")}))
        print("finetunekit side: finetunekit " + shlex.join(ours_cmd), flush=True)
        results: dict[str, list[dict]] = {"trainer": [], "finetunekit": []}
        for r in range(args.rounds):
            order = ("trainer", "finetunekit") if r % 2 == 0 else ("finetunekit", "trainer")
            for side in order:
                child = common + ["--train-csv", str(train), "--val-csv", str(val), "--out", str(tmp / f"run{r}")]
                results[side].append(run_side(side, child))
            t, o = results["trainer"][-1], results["finetunekit"][-1]
            print(f"round {r + 1} ({order[0]} first): finetunekit {o['images_per_s']:.1f} img/s, "
                  f"HF Trainer {t['images_per_s']:.1f} img/s (its own train_samples_per_second "
                  f"{t['own_images_per_s']:.1f}; optim {t['optim']}), ratio {o['images_per_s'] / t['images_per_s']:.3f}"
                  f"  [threads {o['threads']}/{t['threads']}]", flush=True)
    mean = {s: sum(x["images_per_s"] for x in v) / len(v) for s, v in results.items()}
    print(f"total wall {time.perf_counter() - started:.0f} s", flush=True)
    print(f"SUMMARY full fine-tune ({MODEL}, {args.images} images, {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epoch(s)): finetunekit {mean['finetunekit']:.1f} vs HF Trainer {mean['trainer']:.1f} "
          f"images/s, ratio {mean['finetunekit'] / mean['trainer']:.2f}x")


if __name__ == "__main__":
    main()
