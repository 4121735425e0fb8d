"""Kill -9 a training run at random moments, resume it, and check the result is bit-identical to a run
that was never interrupted (final weights, saved best model, every step's loss, every epoch's metrics).

    .venv/bin/python bench/crash_resume.py --kills 12          # ~6 min on 2 CPU cores

Prints one line per kill and a summary line. The run: CIFAR-10 mini, 40 images a class, timm's
test_efficientnet at 32 px, strong augmentation + MixUp/CutMix + EMA + drop path, batch 16 x accumulation
2, 2 epochs, a checkpoint every 3 updates, 2 loader workers (so kills also land in worker processes' lives).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-mini" / "train"


def manifest(path: Path, per_class: int = 40) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for folder in sorted(p for p in CIFAR.iterdir() if p.is_dir()):
            for image in sorted(folder.iterdir())[:per_class]:
                w.writerow([str(image), folder.name])
    return path


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetunekit.cli", "fit", "--data", str(data), "--model", "timm:test_efficientnet",
            "--no-pretrained", "--image-size", "32", "--augment", "strong", "--mixup", "0.2", "--cutmix", "1.0",
            "--ema", "0.9", "--drop-path", "0.1", "--epochs", "2", "--batch-size", "16", "--grad-accum", "2",
            "--num-workers", "2", "--checkpoint-every", "3", "--out", str(out), "--quiet", *extra]


def outcome(run: Path):
    final = sorted((run / "checkpoints").glob("step-*"))[-1]
    history = [{k: v for k, v in r.items() if k not in ("train_samples_per_s", "epoch_seconds")}
               for r in csv.DictReader((run / "history.csv").open())]
    return (load_file(str(final / "model.safetensors")), load_file(str(run / "model" / "model.safetensors")),
            (run / "steps.csv").read_text(), history)


def _rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def same(a, b) -> bool:
    return (all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
            and a[2] == b[2] and a[3] == b[3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = manifest(tmp / "train.csv")
        proc = subprocess.Popen(args(data, tmp / "reference"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        while not (tmp / "reference" / "steps.csv").exists() and proc.poll() is None:
            time.sleep(0.02)
        t0 = time.perf_counter()
        assert proc.wait() == 0
        total = time.perf_counter() - t0  # from the first checkpoint to the end of the run
        reference = outcome(tmp / "reference")
        ok = 0
        for i in range(a.kills):
            out = tmp / f"run{i}"
            proc = subprocess.Popen(args(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
            # a random moment: after a random number of recorded steps (steps.csv grows at each checkpoint),
            # then a random delay; timed by progress, so a busy machine does not push kills past the end
            steps, delay = rng.randint(1, 38), rng.uniform(0, 1.5)
            while _rows(out / "steps.csv") < steps and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, as an OOM killer would
            proc.wait()
            done = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
            r = subprocess.run(args(data, out, "--resume", str(out)), capture_output=True, text=True, env=env)
            good = r.returncode == 0 and same(outcome(out), reference)
            ok += good
            print(f"kill {i + 1}: {delay:.2f} s after step {steps} was recorded, latest checkpoint {done[-1] if done else None}: "
                  f"{'identical' if good else 'DIFFERENT: ' + r.stderr.strip()[-300:]}", flush=True)
        print(f"SUMMARY kill -9 at {a.kills} random points: {ok}/{a.kills} resumed with bit-identical final "
              f"weights, best model, step losses and epoch metrics (the run: 44 steps, {total:.0f} s from its "
              f"first checkpoint to its end)")


if __name__ == "__main__":
    main()
