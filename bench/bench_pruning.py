"""Does `--prune` pay? The built-in EfficientNet-Lite0 (ImageNet weights) fine-tuned on CIFAR-10 mini at 64 px
(a 2,000-image training subset, 200 a class; 10% of it held out for validation; scored on the 1,000 test
images), every layer trained (`--strategy full`) for 3 epochs, at `--prune 0`, `0.3` and `0.5`: the pruned runs
prune the pretrained model with its new head, then the same 3 epochs recover it.

For each saved model (loaded back with finetunekit.load, as a user would): parameters, MACs of one 64 px image
(torch-pruning's counter), the size of model.safetensors, eager latency at batch 1 (median of 200 calls) and
throughput at batch 32 (median of 20 calls), under torch.inference_mode with 2 threads after 10 warm-up calls;
and the test accuracy. Each row is appended to bench/pruning.jsonl with the machine's load average, since the
CPUs are shared.

    .venv/bin/python bench/bench_pruning.py                   # ~15 minutes on 2 idle CPU cores
    .venv/bin/python bench/bench_pruning.py --ratios 0.5 --epochs 1
    .venv/bin/python bench/bench_pruning.py --speed-only 5     # no training: size, MACs, speed (~3 minutes)
    .venv/bin/python bench/bench_pruning.py --speed-only 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's finetunekit, also where another one is installed
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-mini"
RESULTS = ROOT / "bench" / "pruning.jsonl"
SIZE, THREADS = 64, 2


def manifest(path: Path, folder: Path, per_class: int) -> Path:
    lines = ["path,label"]
    for c in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        lines += [f"{p},{c}" for p in sorted((folder / c).glob("*.jpg"))[:per_class]]
    path.write_text("\n".join(lines) + "\n")
    return path


def fit(ratio: float, train: Path, out: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "finetunekit.cli", "fit", "--data", str(train), "--test", str(CIFAR / "test"),
           "--image-size", str(SIZE), "--strategy", "full", "--epochs", str(epochs), "--num-workers", "1",
           "--seed", "0", "--out", str(out), "--quiet", *(["--prune", str(ratio)] if ratio else [])]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())


def timed(fn, calls: int, warmup: int = 10) -> float:
    """Median seconds of one call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(run: Path) -> dict:
    import finetunekit

    return measure_module(finetunekit.load(run).module, run / "model" / "model.safetensors")


def measure_module(module, weights: Path) -> dict:
    import torch

    from finetunekit.pruning import count

    torch.set_num_threads(THREADS)
    module = module.eval()
    macs, params = count(module, SIZE)
    one, batch = torch.randn(1, 3, SIZE, SIZE), torch.randn(32, 3, SIZE, SIZE)
    with torch.inference_mode():
        latency = timed(lambda: module(one), 200)
        per_batch = timed(lambda: module(batch), 20)
    return {"params": params, "macs": macs, "file_mb": round(weights.stat().st_size / 2**20, 2),
            "latency_b1_ms": round(latency * 1e3, 2), "throughput_b32_img_s": round(32 / per_batch, 1)}


def speed_only(ratios: list[float], work: Path, rounds: int) -> None:
    """Size, MACs and speed of the pruned architectures without training (they do not depend on the weights'
    values): the pretrained model with a 10-class head, pruned as `fit --prune` prunes it, measured in
    `rounds` interleaved rounds (so a busy machine slows every model alike) and the medians kept."""
    from safetensors.torch import save_file

    from finetunekit.models import create_backbone
    from finetunekit.pruning import prune

    modules = {}
    for r in ratios:
        backbone = create_backbone("efficientnet_lite0", 10, image_size=SIZE)
        if r:
            prune(backbone, r, SIZE)
        weights = work / f"speed-{r:g}.safetensors"
        save_file({k: v.contiguous() for k, v in backbone.module.state_dict().items()}, str(weights))
        modules[r] = (backbone.module, weights)
    runs: dict[float, list[dict]] = {r: [] for r in ratios}
    for _ in range(rounds):
        for r in ratios:
            runs[r].append(measure_module(*modules[r]))
    for r in ratios:
        row = {**runs[r][0], "latency_b1_ms": statistics.median(x["latency_b1_ms"] for x in runs[r]),
               "throughput_b32_img_s": statistics.median(x["throughput_b32_img_s"] for x in runs[r])}
        write({"model": "efficientnet_lite0", "image_size": SIZE, "prune": r, "trained": False, **row,
               "rounds": rounds, **machine()})


def machine() -> dict:
    return {"threads": THREADS, "cpus": os.cpu_count(), "loadavg": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0,0.3,0.5", help="comma-separated --prune values (0 = not pruned)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=200, help="training images per class")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--speed-only", type=int, default=0, metavar="ROUNDS",
                    help="no training: size, MACs and speed of the pruned architectures, in ROUNDS interleaved rounds")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads of the speed measurements")
    args = ap.parse_args()
    THREADS = args.threads
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.speed_only:
        return speed_only([float(r) for r in args.ratios.split(",")], work, args.speed_only)
    train = manifest(work / "train.csv", CIFAR / "train", args.per_class)
    for ratio in (float(r) for r in args.ratios.split(",")):
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        metrics = fit(ratio, train, work / f"prune-{ratio:g}", args.epochs)
        write({"model": "efficientnet_lite0", "data": f"cifar10-mini {args.per_class}/class", "image_size": SIZE,
               "epochs": args.epochs, "prune": ratio, "trained": True, **measure(work / f"prune-{ratio:g}"),
               "test_accuracy": round(metrics["test"]["accuracy"], 4), "val_accuracy": round(metrics["val"]["accuracy"], 4),
               "train_samples_per_s": metrics["train_samples_per_s"], "fit_seconds": round(time.perf_counter() - started, 1),
               "loadavg_before": round(load_before, 2), **machine()})


if __name__ == "__main__":
    main()
