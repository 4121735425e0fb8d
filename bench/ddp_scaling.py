"""Two processes against one on the same machine, the same global batch: training samples/s of `finetunekit fit`.

    PYTHONPATH=. python bench/ddp_scaling.py [--per-class 160] [--size 64] [--batch 32] [--rounds 2]

One process with 2 threads (batch B) against two processes with 1 thread each (batch B/2 each, torchrun, gloo),
EfficientNet-Lite0 (built in, pretrained), full fine-tuning, 1 epoch on CIFAR-10-mini (`--per-class` images of
each class), validation on 20 test images per class; the rounds alternate. Prints and appends to
bench/ddp_scaling.jsonl the epoch's training samples/s (history.csv) and the wall seconds of each run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import CIFAR, write_manifest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="the global batch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ddp-scaling-")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = write_manifest(args.out / "train.csv", CIFAR / "train", args.per_class)
    val = write_manifest(args.out / "val.csv", CIFAR / "test", 20)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def fit(name: str, processes: int) -> dict:
        out = args.out / name
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
            if processes > 1 else []
        cmd = [sys.executable, *launcher, "-m", "finetunekit.cli", "fit", "--data", str(train), "--val", str(val),
               "--model", "efficientnet_lite0", "--image-size", str(args.size), "--epochs", "1", "--strategy", "full",
               "--batch-size", str(args.batch // processes), "--num-workers", "0", "--cpu", "--quiet", "--out", str(out)]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**env, "OMP_NUM_THREADS": str(2 // processes)})
        wall = time.perf_counter() - started
        row = next(csv.DictReader((out / "history.csv").open()))
        return {"samples_per_s": round(float(row["train_samples_per_s"]), 1), "epoch_s": round(float(row["epoch_seconds"]), 1),
                "wall_s": round(wall, 1)}

    for r in range(args.rounds):
        one = fit(f"one-{r}", 1)
        two = fit(f"two-{r}", 2)
        line = {"round": r + 1, "images": 10 * args.per_class, "size": args.size, "global_batch": args.batch,
                "one_process_2_threads": one, "two_processes_1_thread": two,
                "ratio": round(two["samples_per_s"] / one["samples_per_s"], 3)}
        print(json.dumps(line), flush=True)
        with (ROOT / "bench" / "ddp_scaling.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
