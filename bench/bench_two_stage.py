"""Does `--init` pay on a small target set? Two-stage transfer (finetunekit/twostage.py) against starting from
ImageNet, side by side: the same target recipe and seed, only the starting weights differ.

Stage 1, the "similar public dataset": the built-in EfficientNet-Lite0 (ImageNet) fine-tuned on cifar10-mini's
first five classes (airplane, automobile, bird, cat, deer: 2,500 training images, 250 held out for validation),
64 px, 3 epochs, the default recipe otherwise (auto: full). Its test accuracy on those classes' 500 test images
is reported for context.

Stage 2, the small target: the other five classes (dog, frog, horse, ship, truck) with 20 training images a class
(the first 20 of each class's folder), a validation set of the next 10 a class, scored on their 500 test images.
64 px, the default recipe otherwise (auto: full, 10 epochs). Two arms per seed: from ImageNet (`--model
efficientnet_lite0`), and `--init STAGE1` (stage 1's backbone; a new head, as the classes differ). Seeds 0, 1, 2.

The data folders are symlinks under --work (WORK/data/stage1, WORK/data/target-n20-v10; the shared data is
read in place, never written). `--per-class 100` repeats stage 2 with 100 training images a class. Rows go to
bench/two_stage.jsonl, one per target fit and one summary.

    .venv/bin/python bench/bench_two_stage.py --work /tmp/ftk19-init     # about 6 minutes here (2 CPU cores; --per-class 100: 3.5 more)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CIFAR = DATA / "cifar10-mini"
RESULTS = ROOT / "bench" / "two_stage.jsonl"
SOURCE = ["airplane", "automobile", "bird", "cat", "deer"]
TARGET = ["dog", "frog", "horse", "ship", "truck"]
SEEDS = (0, 1, 2)
STAGE1 = ["--model", "efficientnet_lite0", "--image-size", "64", "--epochs", "3", "--seed", "0"]
TARGET_RECIPE = ["--image-size", "64"]


def link(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)


def make_data(work: Path, per_class: int, val_per_class: int) -> Path:
    data = work / "data"
    for c in SOURCE:
        link(sorted((CIFAR / "train" / c).glob("*.jpg")), data / "stage1" / "train" / c)
        link(sorted((CIFAR / "test" / c).glob("*.jpg")), data / "stage1" / "test" / c)
    target = data / f"target-n{per_class}-v{val_per_class}"
    for c in TARGET:
        files = sorted((CIFAR / "train" / c).glob("*.jpg"))
        link(files[:per_class], target / "train" / c)
        link(files[per_class:per_class + val_per_class], target / "val" / c)
        link(sorted((CIFAR / "test" / c).glob("*.jpg")), target / "test" / c)
    return data


def fit(out: Path, args: list[str]) -> tuple[dict, float]:
    """`finetunekit fit ARGS --out OUT` in a fresh process (reused when OUT/metrics.json exists): (metrics, wall s)."""
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text()), float("nan")
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "finetunekit.cli", "fit", *args, "--out", str(out), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "FINETUNEKIT_REPORT": "0", "PYTHONPATH": str(ROOT)})
    if r.returncode:
        sys.exit(f"fit {out} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - started


def machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}


def write(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftk-two-stage"), help="data symlinks and runs")
    ap.add_argument("--per-class", type=int, default=20, help="target training images a class (default: 20)")
    ap.add_argument("--val-per-class", type=int, default=10, help="target validation images a class (default: 10)")
    args = ap.parse_args()
    data = make_data(args.work, args.per_class, args.val_per_class)
    runs = args.work / "runs"
    stage1 = runs / "stage1"
    s1, s1_wall = fit(stage1, ["--data", str(data / "stage1" / "train"), "--test", str(data / "stage1" / "test"),
                               *STAGE1])
    folder = data / f"target-n{args.per_class}-v{args.val_per_class}"
    target = ["--data", str(folder / "train"), "--val", str(folder / "val"), "--test", str(folder / "test"),
              *TARGET_RECIPE]
    arms = {"imagenet": ["--model", "efficientnet_lite0"], "init": ["--init", str(stage1)]}
    scores: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in SEEDS:
        for arm, extra in arms.items():
            out = runs / f"target-{arm}-s{seed}-n{args.per_class}"
            m, wall = fit(out, [*target, *extra, "--seed", str(seed)])
            scores[arm].append(m["test"]["accuracy"])
            write({"arm": arm, "seed": seed, "per_class": args.per_class, "test_accuracy": m["test"]["accuracy"],
                   "test_macro_f1": m["test"]["macro_f1"], "val_accuracy": m["val"]["accuracy"],
                   "strategy": m["strategy"], "epochs_run": m["epochs_run"], "best_epoch": m["best_epoch"],
                   "init": m.get("init", {}).get("head"), "wall_s": round(wall, 1), "run": str(out), **machine()})
    gains = [b - a for a, b in zip(scores["imagenet"], scores["init"])]
    write({"summary": True, "stage1": {"classes": SOURCE, "test_accuracy": s1["test"]["accuracy"],
                                       "recipe": " ".join(STAGE1)},
           "target": {"classes": TARGET, "train_per_class": args.per_class, "val_per_class": args.val_per_class,
                      "test_images": 500, "recipe": " ".join(TARGET_RECIPE)},
           "seeds": list(SEEDS), "imagenet": scores["imagenet"], "init": scores["init"],
           "mean_imagenet": statistics.mean(scores["imagenet"]), "mean_init": statistics.mean(scores["init"]),
           "gain_per_seed": gains, "mean_gain": statistics.mean(gains), **machine()})
    print(f"stage 1 test accuracy {s1['test']['accuracy']:.4f}; target ({args.per_class} a class) test accuracy: "
          f"ImageNet {', '.join(f'{x:.4f}' for x in scores['imagenet'])} (mean "
          f"{statistics.mean(scores['imagenet']):.4f}); --init {', '.join(f'{x:.4f}' for x in scores['init'])} "
          f"(mean {statistics.mean(scores['init']):.4f}); gain {statistics.mean(gains):+.4f}")


if __name__ == "__main__":
    main()
