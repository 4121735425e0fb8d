"""Does `--domain-adapt` pay? Target-domain accuracy with and without CORAL and MMD, on a domain shift built
offline.

Source (labeled): CIFAR-10 mini training images (`--per-class` a class; 10% held out for validation, as fit does).
Target: the 1,000 CIFAR-10 mini test images, shifted (`--shift`):

    invert      colours inverted (255 - x)
    gray-blur   grayscale (kept as 3 channels) + Gaussian blur of radius 1.5 px at the native 32 px
    rotate      rotated by 90 degrees

and cut in two halves by position within each class: the even-numbered images of each class are the unlabeled
target pool that training reads (`--target-data`, its class folders ignored), the odd-numbered ones the labeled
target test set that only the final scoring reads (`finetunekit evaluate RUN --data`). Same images, unshifted
(the odd half): the source-domain score, to see what adaptation costs there.

Every run: the built-in EfficientNet-Lite0 (ImageNet weights) at `--size` px (default 64), every layer trained
(`--strategy full`), the same seed, epochs, batch and augmentation; the runs differ only in
--domain-adapt/--da-weight. `coral:0` (a weight of 0) forwards the target batch with the source batch and
adds nothing to the loss: it separates what the joint BatchNorm statistics do from what the loss does.

Rows go to bench/domain_adapt.jsonl (one per run, with the machine's load average: the CPUs are shared); the
table printed at the end has each run's gain over `none`, measured in the same invocation.

    .venv/bin/python bench/bench_domain_adapt.py                       # ~5 minutes (4 runs) on 2 CPU cores
    .venv/bin/python bench/bench_domain_adapt.py --runs none,coral:1,mmd:1 --per-class 50 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's finetunekit, also where another one is installed
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-mini"
RESULTS = ROOT / "bench" / "domain_adapt.jsonl"


def shifted(image, shift: str):
    from PIL import ImageFilter, ImageOps

    image = image.convert("RGB")
    if shift == "invert":
        return ImageOps.invert(image)
    if shift == "gray-blur":
        return ImageOps.grayscale(image).convert("RGB").filter(ImageFilter.GaussianBlur(1.5))
    if shift == "rotate":
        return image.rotate(90)
    raise SystemExit(f"--shift {shift}: expected invert, gray-blur or rotate")


def build_target(root: Path, shift: str) -> dict[str, Path]:
    """root/pool (unlabeled: the even half, shifted), root/test (labeled: the odd half, shifted) and root/clean
    (the odd half as it is)."""
    from PIL import Image

    out = {k: root / k for k in ("pool", "test", "clean")}
    for c in sorted(d.name for d in (CIFAR / "test").iterdir() if d.is_dir()):
        for k in out:
            (out[k] / c).mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(sorted((CIFAR / "test" / c).glob("*.jpg"))):
            with Image.open(f) as im:
                if i % 2 == 0:
                    shifted(im, shift).save(out["pool"] / c / f"{f.stem}.png")
                else:
                    shifted(im, shift).save(out["test"] / c / f"{f.stem}.png")
                    im.convert("RGB").save(out["clean"] / c / f"{f.stem}.png")
    return out


def manifest(path: Path, per_class: int) -> Path:
    lines = ["path,label"]
    for c in sorted(d.name for d in (CIFAR / "train").iterdir() if d.is_dir()):
        lines += [f"{p},{c}" for p in sorted((CIFAR / "train" / c).glob("*.jpg"))[:per_class]]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shift", default="invert", choices=("invert", "gray-blur", "rotate"))
    ap.add_argument("--runs", default="none,coral:0,coral:1,mmd:1",
                    help="comma-separated: none, or METHOD:WEIGHT (coral:1, mmd:0.5; coral:0 = target batches, no loss)")
    ap.add_argument("--per-class", type=int, default=200, help="source training images per class (of 500)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment", default="light")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="")
    ap.add_argument("--no-record", action="store_true", help="print the rows, do not append them to the .jsonl")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftk-da-bench-"))
    os.environ.setdefault("FINETUNEKIT_CACHE", str(work / "cache"))
    os.environ["FINETUNEKIT_REPORT"] = "0"
    import finetunekit

    target = build_target(work / "target", args.shift)
    source = manifest(work / "train.csv", args.per_class)
    rows = []
    for spec in args.runs.split(","):
        method, _, weight = spec.partition(":")
        train = {"epochs": args.epochs, "batch_size": args.batch_size, "strategy": "full", "seed": args.seed}
        data = {"path": str(source), "image_size": args.size, "augment": args.augment}
        if method != "none":
            train.update(domain_adapt=method, da_weight=float(weight or 1))
            data["target_data"] = str(target["pool"])
        out = work / f"run-{method}-{weight or 'x'}"
        started = time.perf_counter()
        run = finetunekit.fit({"data": data, "model": {"name": "efficientnet_lite0"}, "train": train,
                               "out": str(out), "quiet": True})
        seconds = time.perf_counter() - started
        shifted_acc = finetunekit.evaluate(run.run_dir, target["test"])["accuracy"]
        clean_acc = finetunekit.evaluate(run.run_dir, target["clean"])["accuracy"]
        da = run.metrics.get("domain_adapt", {})
        row = {"bench": "domain_adapt", "shift": args.shift, "run": spec, "method": method,
               "weight": float(weight or 1) if method != "none" else None, "target_accuracy": round(shifted_acc, 4),
               "source_accuracy": round(clean_acc, 4), "val_accuracy": round(run.metrics["val"]["accuracy"], 4),
               "da_loss_by_epoch": da.get("loss_by_epoch"), "fit_seconds": round(seconds, 1),
               "per_class": args.per_class, "epochs": args.epochs, "size": args.size, "batch_size": args.batch_size,
               "augment": args.augment, "seed": args.seed, "target_pool": 500, "target_test": 500,
               "load_avg": round(os.getloadavg()[0], 2), "note": args.note}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.no_record:
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
    base = next((r for r in rows if r["method"] == "none"), None)
    print(f"\nshift {args.shift}: EfficientNet-Lite0 {args.size}px, {args.per_class * 10} source images, "
          f"{args.epochs} epochs, seed {args.seed}")
    print(f"{'run':<12} {'target acc':>10} {'vs none':>8} {'source acc':>10} {'vs none':>8} {'fit s':>7}")
    for r in rows:
        dt = f"{r['target_accuracy'] - base['target_accuracy']:+.4f}" if base else ""
        ds = f"{r['source_accuracy'] - base['source_accuracy']:+.4f}" if base else ""
        print(f"{r['run']:<12} {r['target_accuracy']:>10.4f} {dt:>8} {r['source_accuracy']:>10.4f} {ds:>8} "
              f"{r['fit_seconds']:>7.0f}")


if __name__ == "__main__":
    main()
