"""Where the time of `finetunekit fit` goes: a py-spy sampling profile of a short run, summarized.

Runs a full fine-tune (the built-in EfficientNet-Lite0 on CIFAR-10 mini, 64 px, batch 32, 2 epochs,
1 loader worker) under `py-spy record --idle --threads --subprocesses` and sorts every sample of the
training process's main thread into: setup (imports, data scan, model load, cache build), waiting for
the data loader, forward pass, backward pass, optimizer step, other per-step work of the loop,
validation, and saving. Samples of the loader worker processes are counted apart (they run in
parallel). Needs py-spy (`.venv/bin/pip install py-spy`; not a dependency of finetunekit).

    .venv/bin/python bench/profile_fit.py                       # ~3 minutes on 2 CPU cores
    .venv/bin/python bench/profile_fit.py --cache-images off    # the same, decoding JPEGs every epoch
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import CIFAR, write_manifest  # noqa: E402

# first match wins, tested against the whole stack (outermost frame first)
PHASES = [
    ("validation", r"evaluate \(finetunekit/evaluation\.py"),
    ("saving (model folder, checkpoints)", r"(save_model_folder|Checkpoints\.save|checkpoint\.save)"),
    ("waiting for the data loader", r"fit \(finetunekit/loop\.py[^;]*;.*(__next__|_next_data) \(.*dataloader"),
    ("optimizer step", r"fit \(finetunekit/loop\.py[^;]*;.*(step|_step_unless_nonfinite) \(.*(optim|loop)"),
    ("backward pass", r"fit \(finetunekit/loop\.py[^;]*;.*backward"),
    ("forward pass", r"fit \(finetunekit/loop\.py[^;]*;.*step \(finetunekit/tasks/base\.py"),
    ("other per-step work of the loop", r"fit \(finetunekit/loop\.py"),
    ("setup (imports, scan, model, cache build) and the rest", r""),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100, help="training images per class")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--cache-images", default="on")
    ap.add_argument("--keep", type=Path, help="also copy py-spy's raw profile here (a flamegraph input)")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    tmp = Path(tempfile.mkdtemp(prefix="profile-fit-"))
    try:
        train = write_manifest(tmp / "train.csv", CIFAR / "train", args.per_class)
        val = write_manifest(tmp / "val.csv", CIFAR / "test", 10)
        cmd = [sys.executable, "-m", "finetunekit.cli", "fit", "--data", str(train), "--val", str(val),
               "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--batch-size", "32",
               "--num-workers", "1", "--cache-images", args.cache_images, "--checkpoint-every", "epoch",
               "--out", str(tmp / "run"), "--quiet"]
        raw = tmp / "profile.txt"
        env = {**os.environ, "FINETUNEKIT_CACHE": str(tmp / "cache")}
        subprocess.run([spy, "record", "--idle", "--threads", "--subprocesses", "--rate", "50", "--format", "raw",
                        "-o", str(raw), "--", *cmd], check=True, env=env, capture_output=True)
        if args.keep:
            shutil.copy(raw, args.keep)
        summarize(raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(raw: Path) -> None:
    threads: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        k = 0
        while k < len(parts) and parts[k].startswith("process "):
            k += 1  # a loader worker's samples come as "process parent;process child;thread;frames"
        pid = parts[k - 1].split(":")[0]
        thread = parts[k] if k < len(parts) else ""
        threads[(pid, thread)][";".join(parts[k + 1:])] += int(count)
    main = max(threads, key=lambda t: sum(n for s, n in threads[t].items() if "run.py" in s))
    phases = collections.Counter()
    for stack, n in threads[main].items():
        phases[next(name for name, pattern in PHASES if re.search(pattern, stack))] += n
    total = sum(phases.values())
    print(f"main thread of the training process: {total / 50:.0f}s sampled (50 Hz, idle included)")
    for name, _ in PHASES:
        print(f"  {name:<56} {phases[name] / 50:6.1f}s {100 * phases[name] / total:5.1f} %")
    busy = sum(n for (pid, _), c in threads.items() if pid != main[0] for s, n in c.items()
               if "_worker_loop" in s and "fetch" in s)
    print(f"loader worker processes, fetching samples: {busy / 50:.1f}s")
    inner = collections.Counter()
    for stack, n in threads[main].items():
        if re.search(PHASES[2][1], stack) is None and re.search(r"fit \(finetunekit/loop\.py", stack):
            inner[stack.rsplit(";", 1)[-1]] += n
    print("innermost frames inside the loop's steps (top 12):")
    for frame, n in inner.most_common(12):
        print(f"  {n / 50:6.1f}s  {frame[:110]}")


if __name__ == "__main__":
    main()
