"""Does `finetunekit search` pay? Two measurements, each appended to bench/search.jsonl (with the machine's load
average, since the CPUs are shared):

cifar  The built-in EfficientNet-Lite0 (ImageNet weights) at 64 px on a CIFAR-10 mini subset (--per-class images
       a class of train/, 20% of them held out for validation), --epochs each, 16 trials over lr, strategy
       (full, lp-ft), weight decay and label smoothing: the same search (seed 0, TPE) with --pruner median and with
       --pruner none, one after the other, each with a cold cache folder. Wall time, best validation accuracy,
       epochs trained.
sst2   The built-in MiniLM on an SST-2 subset (the first --rows rows of train.tsv, 10% held out for validation;
       dev.tsv as the test set, scored once per trial by its best epoch), --epochs each: the default recipe's
       fit against an --trials search over lr, weight decay, label smoothing and batch size (selected on the
       validation split, so the dev accuracy of the chosen trial is a held-out figure).

    .venv/bin/python bench/bench_search.py cifar                     # ~20 minutes on 2 CPU cores
    .venv/bin/python bench/bench_search.py sst2                      # ~12 minutes
    .venv/bin/python bench/bench_search.py cifar --trials 4 --per-class 20 --epochs 2   # a smoke run
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
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "search.jsonl"

CIFAR_SPACE = """\
train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
train.strategy: [full, lp-ft]
train.weight_decay: {low: 0.0, high: 0.1}
train.label_smoothing: [0.0, 0.1, 0.2]
"""
SST2_SPACE = """\
train.lr: {low: 3.0e-5, high: 1.0e-3, log: true}
train.weight_decay: {low: 0.0, high: 0.1}
train.label_smoothing: [0.0, 0.1]
train.batch_size: [16, 32]
"""


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def cli(args: list[str], cache: Path) -> float:
    """Run `finetunekit ARGS` with its own cache folder; its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINETUNEKIT_CACHE": str(cache)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetunekit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if done.returncode:
        sys.exit(f"failed: finetunekit {' '.join(args)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def rows(study: Path) -> list[dict]:
    return list(csv.DictReader((study / "results.csv").open()))


def summary(study: Path, seconds: float, monitor: str) -> dict:
    r = rows(study)
    complete = [x for x in r if x["state"] == "complete"]
    best = complete[0] if complete else None
    out = {"wall_s": round(seconds, 1), "trials": len(r), "complete": len(complete),
           "pruned": sum(x["state"] == "pruned" for x in r), "epochs_trained": sum(int(x["epochs"] or 0) for x in r),
           f"best_val_{monitor}": float(best["value"]) if best else None, "best_trial": int(best["trial"]) if best else None,
           "best_params": {k: v for k, v in (best or {}).items() if k.startswith(("train.", "data.", "model."))}}
    if best:
        metrics = json.loads((Path(best["run"]) / "metrics.json").read_text())
        if "test" in metrics:
            out["best_test_accuracy"] = metrics["test"]["accuracy"]
            # every finished trial's (val, test): how well the validation split ranks them
            pairs = []
            for x in r:
                m = json.loads((Path(x["run"]) / "metrics.json").read_text()) if x["run"] else {}
                if "test" in m:
                    pairs.append([x["trial"], x["state"], round(m["val"]["accuracy"], 4), round(m["test"]["accuracy"], 4)])
            out["trials_val_test"] = pairs
    return out


def record(row: dict) -> None:
    row = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": os.getloadavg()[0], **row}
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print("SUMMARY", json.dumps(row))


def cifar(a) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    lines = ["path,label"]
    for c in sorted(d.name for d in (DATA / "cifar10-mini" / "train").iterdir()):
        lines += [f"{p},{c}" for p in sorted((DATA / "cifar10-mini" / "train" / c).glob("*.jpg"))[:a.per_class]]
    (work / "train.csv").write_text("\n".join(lines) + "\n")
    (work / "space.yaml").write_text(CIFAR_SPACE)
    result = {"bench": "cifar", "per_class": a.per_class, "epochs": a.epochs, "trials": a.trials, "size": 64}
    for pruner in a.pruners:
        study = work / f"study-{pruner}"
        seconds = cli(["search", "--data", str(work / "train.csv"), "--val-fraction", "0.2", "--image-size", "64",
                       "--epochs", str(a.epochs), "--num-workers", "1", "--seed", "0", "--quiet",
                       "--space", str(work / "space.yaml"), "--trials", str(a.trials), "--pruner", pruner,
                       "--out", str(study)], work / f"cache-{pruner}")
        result[pruner] = summary(study, seconds, "accuracy")
        print(pruner, json.dumps(result[pruner]), flush=True)
    if "median" in result and "none" in result:
        result["time_ratio_none_over_median"] = round(result["none"]["wall_s"] / result["median"]["wall_s"], 2)
    record(result)


def sst2(a) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    with (DATA / "sst2" / "train.tsv").open() as f:
        (work / "train.tsv").write_text("".join(line for _, line in zip(range(a.rows + 1), f)))
    (work / "space.yaml").write_text(SST2_SPACE)
    common = ["--task", "text-classification", "--model", "minilm", "--data", str(work / "train.tsv"),
              "--test", str(DATA / "sst2" / "dev.tsv"), "--text-column", "sentence", "--label-column", "label",
              "--epochs", str(a.epochs), "--seed", "0", "--quiet"]
    result = {"bench": "sst2", "rows": a.rows, "epochs": a.epochs, "trials": a.trials}
    seconds = cli(["fit", *common, "--batch-size", "32", "--out", str(work / "default")], work / "cache")
    m = json.loads((work / "default" / "metrics.json").read_text())
    result["default"] = {"wall_s": round(seconds, 1), "val_accuracy": m["val"]["accuracy"],
                         "test_accuracy": m["test"]["accuracy"], "lr": m.get("lr")}
    print("default", json.dumps(result["default"]), flush=True)
    study = work / "study"
    seconds = cli(["search", *common, "--space", str(work / "space.yaml"), "--trials", str(a.trials),
                   "--pruner", a.pruners[0], "--out", str(study)], work / "cache")
    result["search"] = {"pruner": a.pruners[0], **summary(study, seconds, "accuracy")}
    record(result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("cifar", "sst2"))
    p.add_argument("--trials", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--pruners", default=None, help="cifar: comma-separated (default: median,none); sst2: one")
    a = p.parse_args()
    a.trials = a.trials or (16 if a.what == "cifar" else 8)
    a.epochs = a.epochs or (3 if a.what == "cifar" else 2)
    a.pruners = (a.pruners or ("median,none" if a.what == "cifar" else "median")).split(",")
    cifar(a) if a.what == "cifar" else sst2(a)


if __name__ == "__main__":
    main()
