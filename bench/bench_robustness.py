"""Robustness of a fine-tuned image model, measured: clean accuracy beside FGSM, PGD and the common corruptions.

    PYTHONPATH=. .venv/bin/python bench/bench_robustness.py RUN [--data DIR] [--eps 1/255,2/255,8/255]
        [--severities 1,3,5] [--limit N]

RUN: a `finetunekit fit` run; docs/robustness.md trains the one measured there (cifar10-mini, EfficientNet-Lite0,
64 px, the default recipe). The bench runs the real command line,

    finetunekit evaluate RUN --attack fgsm,pgd --eps ... --corruptions all --severities ... --output TMP.json

in a subprocess, timed (wall clock, model loading included), and appends one row to bench/robustness.jsonl:
the clean accuracy, each condition's accuracy and its ratio to clean, each condition's seconds and their ratio
to the clean pass's, the environment. No --data: the run's test set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "robustness.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--eps", default="1/255,2/255,8/255")
    parser.add_argument("--severities", default="1,3,5")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "robustness.json"
        command = [sys.executable, "-m", "finetunekit.cli", "evaluate", str(args.run), "--attack", "fgsm,pgd",
                   "--eps", args.eps, "--corruptions", "all", "--severities", args.severities, "--output", str(out)]
        command += ["--data", str(args.data)] if args.data else []
        command += ["--limit", str(args.limit)] if args.limit else []
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"evaluate failed ({done.returncode}): {done.stderr.strip()}")
        print(done.stdout, end="")
        report = json.loads(out.read_text(encoding="utf-8"))
    metric, clean = report["metric"], report["clean"]
    conditions = {}
    for a in report["attacks"]:
        conditions[f"{a['attack']}@{a['eps_text']}"] = a
    for c in report["corruptions"]:
        conditions[f"{c['corruption']}@{c['severity']}"] = c
    row = {"run": str(args.run), "data": report["data"], "samples": report["samples"], "metric": metric,
           "clean": clean[metric], "clean_seconds": clean["seconds"],
           "accuracy": {k: v[metric] for k, v in conditions.items()},
           "accuracy_ratio": {k: round(v[metric] / clean[metric], 4) for k, v in conditions.items()},
           "seconds": {k: v["seconds"] for k, v in conditions.items()},
           "seconds_ratio": {k: round(v["seconds"] / clean["seconds"], 2) for k, v in conditions.items()},
           "success_rate": {k: v["success_rate"] for k, v in conditions.items() if "success_rate" in v},
           "pass_seconds": report["seconds"], "wall_seconds": round(wall, 1), "pgd_steps": 10,
           "device": report["device"], "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or "cpu", "cores": len(os.sched_getaffinity(0)), "load_1min": os.getloadavg()[0],
           "date": time.strftime("%Y-%m-%d")}
    with OUT.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    worst = min(conditions, key=lambda k: conditions[k][metric])
    print(f"SUMMARY robustness: samples={row['samples']} clean={row['clean']:.4f} "
          + " ".join(f"{k}={v:.4f}" for k, v in row["accuracy"].items() if k.startswith(("fgsm", "pgd")))
          + f" worst={worst} wall={row['wall_seconds']}s")


if __name__ == "__main__":
    main()
